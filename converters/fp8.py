"""FP8 block-quantised HF weights (DeepSeek-V3): find each weight's `weight_scale_inv` and dequantise to bf16.

A quantised weight `W` (float8_e4m3fn, `[out, in]`) comes with `W_scale_inv` (`[ceil(out/b0), ceil(in/b1)]`,
float32): the real weight is `W * scale_inv` broadcast over each `b0 x b1` block (128 x 128 for DeepSeek-V3).
Pure functions; the engine calls them one tensor at a time, so memory stays at one weight.
"""
from __future__ import annotations

import math
from typing import Collection, Sequence

import torch

from bridge.errors import BridgeError

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def scale_names(available: Collection[str], needed: Collection[str]) -> dict[str, str]:
    """Weight name -> its scale tensor's name, for every needed weight that has one."""
    return {name: name + SCALE_SUFFIX for name in needed if name + SCALE_SUFFIX in available}


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int] | None = None,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`[out, in]` fp8 weight x per-block `scale_inv` -> `dtype`; block rows/columns at the edges may be partial."""
    b0, b1 = tuple(block or DEFAULT_BLOCK)
    if weight.dim() != 2:
        raise BridgeError(f"FP8 block dequantisation needs a 2-D weight, got shape {tuple(weight.shape)}")
    out_dim, in_dim = weight.shape
    want = (math.ceil(out_dim / b0), math.ceil(in_dim / b1))
    if tuple(scale_inv.shape) != want:
        raise BridgeError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {out_dim}x{in_dim} weight with "
                          f"{b0}x{b1} blocks needs {want} (check quantization_config.weight_block_size)")
    scale = scale_inv.float().repeat_interleave(b0, dim=0)[:out_dim].repeat_interleave(b1, dim=1)[:, :in_dim]  # (out, in)
    return (weight.float() * scale).to(dtype)


def quantize(weight: torch.Tensor, block: Sequence[int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse for tests and tiny checkpoints: per-block absmax scaling into float8_e4m3fn (448 = its max)."""
    b0, b1 = block
    out_dim, in_dim = weight.shape
    rows, cols = math.ceil(out_dim / b0), math.ceil(in_dim / b1)
    padded = torch.zeros(rows * b0, cols * b1, dtype=torch.float32)
    padded[:out_dim, :in_dim] = weight.float()
    blocks = padded.view(rows, b0, cols, b1)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # (rows, cols)
    q = (blocks / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn).view(rows * b0, cols * b1)
    return q[:out_dim, :in_dim].contiguous(), scale_inv
