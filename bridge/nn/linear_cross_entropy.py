"""The output layer and its vocab-parallel cross entropy in one pass over chunks of tokens, gradients included.

Why: the logits [tokens, V/tp] and their gradient are a training step's largest tensors (2 GiB each in bf16 for
2 x 4096 tokens of a 128k vocabulary), and both are alive at the step's memory peak, the start of backward, when
every layer's activations are held too. Here the tokens go through in chunks: a chunk is projected, its loss taken
and, at once, its gradients formed, because what each token's loss is multiplied by in the step's objective (its
loss-mask entry over the batch's trained tokens) is known before the forward. The hidden state's gradient [tokens, h]
is kept for backward; the weight's gradient is added into the trainer's fp32 gradient buffer by the GEMM itself
where the trainer fuses that (`fuse_wgrad_accumulation`), otherwise summed in an fp32 buffer that backward returns.
Nothing of size [tokens, V] outlives its chunk.

Cost: none in FLOPs. The same three GEMMs per token are run, the forward's, the input gradient's and the weight
gradient's, only earlier and in chunks of about CHUNK_LOGITS logits each (the weight gradient's fp32 buffer is
read and written once per chunk, not once per micro-batch); the cross entropy's passes are those of
bridge.nn.cross_entropy (fused kernels on CUDA), with one all-reduce of the row max and one of the sums per chunk.

The result is the weighted sum of the per-token losses, a scalar that must be differentiated as it is (gradient 1,
as a loss handed to backward is): the gradients were formed for it in the forward. Backward checks that on the
device without waiting for it, so a scaled loss fails loudly instead of training on wrong gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bridge.fused import fused
from bridge.nn.cross_entropy import logits_grad, softmax_terms
from bridge.nn.layers import accumulate_weight_grad
from bridge.parallel.collectives import Group

#: Logits per chunk (bf16: 512 MiB; 2,048 tokens of a 128k vocabulary); a chunk's temporaries are a few times this,
#: whatever the batch. Why not smaller: every chunk's weight-gradient GEMM reads and writes the fp32 [V/tp, h]
#: gradient once more (4.2 GB at the 8B shape's vocabulary, ~1.3 ms on an H100), while its compute grows with the
#: chunk's tokens; at 2,048 tokens the GEMM's own work is still the larger part.
CHUNK_LOGITS = 2**28


def _softcapped(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) in the logits' dtype, HF's order of operations."""
    return torch.tanh(logits / cap) * cap


def _softcap_grad(grad: torch.Tensor, logits: torch.Tensor, cap: float) -> torch.Tensor:
    """The gradient through _softcapped, op for op what autograd computes for it."""
    return torch.ops.aten.tanh_backward(grad * cap, torch.tanh(logits / cap)) / cap


def chunk_rows(tokens: int, v_local: int, logits: int | None = None) -> int:
    """Rows per chunk: the tokens split evenly (one compiled kernel shape) into chunks of at most ~`logits` logits
    (default CHUNK_LOGITS)."""
    n = max(1, -(-tokens * v_local // (logits or CHUNK_LOGITS)))
    while tokens % n:
        n += 1
    return tokens // n


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,  # noqa: ANN001
                token_weights: torch.Tensor, group: Group, vocab_start: int, vocab_size: int | None,
                softcap: float | None, rows: int, grad_mode: bool) -> torch.Tensor:
        # needs_input_grad says what requires grad, also under torch.no_grad(): `grad_mode` is the caller's mode
        wants_hidden, wants_weight = (grad_mode and needed for needed in ctx.needs_input_grad[:2])
        into_main_grad = wants_weight and getattr(weight, "fuse_wgrad_accumulation", False)
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        wide = torch.promote_types(weight.dtype, torch.float32)  # sums over tokens: fp32 at least
        grad_weight = None
        if wants_weight:
            grad_weight = weight.main_grad if into_main_grad else torch.zeros(weight.shape, dtype=wide,
                                                                              device=weight.device)
        total = torch.zeros((), dtype=wide, device=hidden.device)
        for lo in range(0, hidden.shape[0], rows):
            h, t, w = hidden[lo:lo + rows], target[lo:lo + rows], token_weights[lo:lo + rows]
            logits = F.linear(h, weight)  # [rows, V/tp]
            z = logits if softcap is None else fused(_softcapped, h.device)(logits, softcap)
            row_max, sum_exp, predicted = softmax_terms(z, t, group, vocab_start, vocab_size)
            total += ((sum_exp.log() - predicted) * w).sum()
            if not (wants_hidden or wants_weight):
                continue
            grad = fused(logits_grad, h.device)(z, row_max, sum_exp, t, w, vocab_start, vocab_size)
            del z
            if softcap is not None:
                grad = fused(_softcap_grad, h.device)(grad, logits, softcap)
            del logits
            if grad_hidden is not None:
                torch.matmul(grad, weight, out=grad_hidden[lo:lo + rows])
            if grad_weight is not None:
                accumulate_weight_grad(grad_weight, grad, h)
        ctx.into_main_grad = into_main_grad
        ctx.save_for_backward(grad_hidden, None if into_main_grad else grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):  # noqa: ANN001, ANN205
        grad_hidden, grad_weight = ctx.saved_tensors
        if ctx.into_main_grad:  # already in the buffer, for a gradient of exactly 1
            torch._assert_async(grad_total == 1, "the fused loss was scaled after the forward; its weights must hold "
                                                 "every factor")
        elif grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total)
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         token_weights: torch.Tensor, group: Group, vocab_start: int, vocab_size: int | None = None,
                         softcap: float | None = None, rows: int | None = None) -> torch.Tensor:
    """sum over tokens of token_weights * cross_entropy(softcap(hidden W^T), target): a scalar, fp32 (fp64 for
    fp64 weights).

    hidden [..., h] (every token; the caller gathers the sequence under SP), weight [V_pad/tp, h] (this rank's
    vocabulary rows from `vocab_start`), target and token_weights [...] in the hidden's token order. `vocab_size`:
    exclude the padded rows from the softmax. `rows`: tokens per chunk (default: chunk_rows)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t, w = target.reshape(-1), token_weights.reshape(-1).to(torch.promote_types(weight.dtype, torch.float32))
    rows = rows or chunk_rows(h.shape[0], weight.shape[0])
    return _LinearCrossEntropy.apply(h, weight, t, w, group, vocab_start, vocab_size, softcap, rows,
                                     torch.is_grad_enabled())
