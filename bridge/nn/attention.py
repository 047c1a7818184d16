"""Which fused attention kernel SDPA runs (`--attention-backend`, Megatron-LM's names).

fused: cuDNN's fused attention, what Megatron-LM's default Transformer Engine backend runs on
Hopper; flash: FlashAttention-2 as built into PyTorch; unfused: the plain math (softmax(QK^T)V),
for debugging; auto: cuDNN first, then flash, then the others, each taking over when the one before
cannot run a shape. cuDNN comes first because it measured 1.6-1.9x faster than flash for causal
grouped-query attention forward + backward on H200 at bridge's shapes (bench/attention.py,
docs/performance.md); PyTorch's own default order tries flash first. The choice is process-wide
and must be made before torch.compile traces attention, which fixes the kernel in its graph; it
affects CUDA tensors only.
"""
from __future__ import annotations

import contextlib

from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_BACKENDS: dict[str, list[SDPBackend]] = {
    "auto": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH],
    "fused": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "unfused": [SDPBackend.MATH],
}
_active = contextlib.ExitStack()


def set_attention_backend(name: str) -> None:
    """Make `name` (a key of ATTENTION_BACKENDS) the process's SDPA kernel order, replacing an earlier choice."""
    _active.close()
    _active.enter_context(sdpa_kernel(ATTENTION_BACKENDS[name], set_priority=True))
