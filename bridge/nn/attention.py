"""Which fused attention kernel SDPA runs (`--attention-backend`, Megatron-LM's names and default).

flash: FlashAttention-2 (PyTorch's built-in); fused: cuDNN's fused attention, what Megatron-LM's
default Transformer Engine backend runs on Hopper; unfused: the plain math (softmax(QK^T)V),
for debugging; auto: the order measured fastest for bridge's shapes on H100/H200
(bench/attention.py, docs/performance.md), falling back to the next kernel when one cannot take
a shape. The choice is process-wide and must be made before torch.compile traces attention,
which fixes the kernel in the compiled graph; it only applies to CUDA tensors.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_BACKENDS: dict[str, list[SDPBackend]] = {
    "auto": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "fused": [SDPBackend.CUDNN_ATTENTION],
    "unfused": [SDPBackend.MATH],
}
_active = contextlib.ExitStack()
_expand_kv = False
"""cuDNN's kernel does not take grouped-query K/V (enable_gqa): they are repeated per query head for it."""


def set_attention_backend(name: str) -> None:
    """Make `name` (a key of ATTENTION_BACKENDS) the process's SDPA kernel order, replacing an earlier choice."""
    global _expand_kv
    _active.close()
    order = ATTENTION_BACKENDS[name]
    _active.enter_context(sdpa_kernel(order, set_priority=True))
    _expand_kv = order[0] == SDPBackend.CUDNN_ATTENTION


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: ANN003
    """F.scaled_dot_product_attention over [b, heads, s, d] with grouped-query K/V (fewer heads than q)."""
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if _expand_kv and q.is_cuda:
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), **kwargs)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
