"""Cross entropy over vocab-parallel logits, without gathering the vocabulary (Megatron's algorithm).

Padded vocabulary rows take part in the softmax, as in Megatron-LM (their weights are zero after
import, so their logits are 0, not -inf); pass `vocab_size` to exclude them and match an unpadded
loss such as transformers' exactly.

Why it is written this way: the logits are the largest activation of a training step ([tokens, V/tp]:
1 GiB of bf16 for 4 x 2048 tokens of a 128k vocabulary). Upcasting them to fp32 and keeping the
softmax for backward, as a straightforward implementation does, writes and reads that tensor in fp32
about ten times. Here the forward reads the bf16 logits twice (row max; then sum of exponentials
and the target's logit) and keeps only those logits and two fp32 numbers per token; the backward
recomputes the softmax from them in one pass that writes the gradient in the logits' dtype. On CUDA
each pass is one fused kernel (torch.compile); on the CPU the same functions run eagerly. The maths
is unchanged: every exponential and sum is taken in fp32.
"""
from __future__ import annotations

import torch

from bridge.fused import fused
from bridge.parallel.collectives import Group, all_reduce


def _masked(logits: torch.Tensor, vocab_start: int, vocab_size: int | None) -> torch.Tensor:
    """fp32 logits with this shard's rows at or past `vocab_size` (padding) set to -inf."""
    logits = logits.float()
    if vocab_size is None or vocab_start + logits.shape[-1] <= vocab_size:
        return logits
    ids = torch.arange(vocab_start, vocab_start + logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def _local_target(target: torch.Tensor, vocab_start: int, v_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    outside = (target < vocab_start) | (target >= vocab_start + v_local)
    return (target - vocab_start).masked_fill(outside, 0), outside


def local_max(logits: torch.Tensor, vocab_start: int, vocab_size: int | None) -> torch.Tensor:
    """Row maximum of this shard's logits, fp32 [s, b]."""
    return _masked(logits, vocab_start, vocab_size).amax(dim=-1)


def local_terms(logits: torch.Tensor, logits_max: torch.Tensor, target: torch.Tensor, vocab_start: int,
                vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's sum of exp(logit - max) and its part of the target's (logit - max) (0 off-shard), fp32 [s, b]."""
    shifted = _masked(logits, vocab_start, vocab_size) - logits_max.unsqueeze(-1)
    local, outside = _local_target(target, vocab_start, logits.shape[-1])
    predicted = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    return shifted.exp().sum(dim=-1), predicted


def logits_grad(logits: torch.Tensor, logits_max: torch.Tensor, sum_exp: torch.Tensor, target: torch.Tensor,
                grad_loss: torch.Tensor, vocab_start: int, vocab_size: int | None) -> torch.Tensor:
    """(softmax - one_hot(target)) * grad_loss, in the logits' dtype."""
    softmax = (_masked(logits, vocab_start, vocab_size) - logits_max.unsqueeze(-1)).exp() / sum_exp.unsqueeze(-1)
    local, outside = _local_target(target, vocab_start, logits.shape[-1])
    ids = torch.arange(logits.shape[-1], device=logits.device)
    one_hot = (ids == local.unsqueeze(-1)) & ~outside.unsqueeze(-1)
    return ((softmax - one_hot.float()) * grad_loss.float().unsqueeze(-1)).to(logits.dtype)


def softmax_terms(logits: torch.Tensor, target: torch.Tensor, group: Group, vocab_start: int,
                  vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over the whole vocabulary (this shard's terms summed over `group`), fp32 per row: the max logit, the sum of
    exp(logit - max) and the target's logit - max. The loss is log(sum) - that last term."""
    logits_max = all_reduce(fused(local_max, logits.device)(logits, vocab_start, vocab_size), group, "max")
    sum_exp, predicted = fused(local_terms, logits.device)(logits, logits_max, target, vocab_start, vocab_size)
    sums = all_reduce(torch.stack([sum_exp, predicted]), group)  # one collective for both
    return logits_max, sums[0], sums[1]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: Group, vocab_start: int,  # noqa: ANN001
                vocab_size: int | None) -> torch.Tensor:
        logits_max, sum_exp, predicted = softmax_terms(logits, target, group, vocab_start, vocab_size)
        ctx.vocab_start, ctx.vocab_size = vocab_start, vocab_size
        ctx.save_for_backward(logits, logits_max, sum_exp, target)
        return sum_exp.log() - predicted  # [s, b]

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # noqa: ANN001, ANN205
        logits, logits_max, sum_exp, target = ctx.saved_tensors
        grad = fused(logits_grad, logits.device)(logits, logits_max, sum_exp, target, grad_loss,
                                                 ctx.vocab_start, ctx.vocab_size)
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: Group, vocab_start: int,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """logits [s, b, V_pad/tp] (this rank's vocabulary rows from `vocab_start`), target [s, b] -> loss [s, b] (fp32)."""
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_start, vocab_size)
