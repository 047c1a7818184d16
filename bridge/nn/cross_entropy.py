"""Cross entropy over vocab-parallel logits, without gathering the vocabulary (Megatron's algorithm).

Padded vocabulary rows take part in the softmax, as in Megatron-LM (their weights are zero after
import, so their logits are 0, not -inf); pass `vocab_size` to exclude them and match an unpadded
loss such as transformers' exactly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from bridge.parallel.collectives import Group


def _all_reduce(x: torch.Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: Group, vocab_start: int,  # noqa: ANN001
                vocab_size: int | None) -> torch.Tensor:
        ctx.dtype = logits.dtype
        logits = logits.float()  # [s, b, v/tp]
        v_local = logits.shape[-1]
        if vocab_size is not None:
            ids = torch.arange(vocab_start, vocab_start + v_local, device=logits.device)
            logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
        logits_max = logits.max(dim=-1).values
        _all_reduce(logits_max, group, dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)
        outside = (target < vocab_start) | (target >= vocab_start + v_local)
        local_target = (target - vocab_start).masked_fill(outside, 0)
        predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        _all_reduce(predicted, group)
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)
        loss = sum_exp.log() - predicted  # [s, b]
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # noqa: ANN001, ANN205
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax.clone()
        one_hot = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -one_hot.unsqueeze(-1))
        return (grad * grad_loss.unsqueeze(-1)).to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: Group, vocab_start: int,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """logits [s, b, V_pad/tp] (this rank's vocabulary rows from `vocab_start`), target [s, b] -> loss [s, b] (fp32)."""
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_start, vocab_size)
