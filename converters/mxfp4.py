"""MXFP4 HF weights (GPT-OSS's Hub checkpoints): find each weight's `_blocks`/`_scales` pair and dequantise to bf16.

A quantised HF tensor `X` is stored as two: `X_blocks` (uint8, `[..., rows, G, 16]`), two FP4 (e2m1) codes per byte,
the low nibble first, and `X_scales` (uint8, `[..., rows, G]`), one E8M0 exponent per block of 32 values (the
block's values times 2^(scale - 127)). A row of G x 32 values is a row of the weight in nn.Linear's order,
`[out, in]`; GPT-OSS's HF parameters are `[in, out]` per expert (`gate_up_proj` [E, h, 2F], `down_proj` [E, F, h]),
so the dequantised weight is the transpose of the rows. Pure functions; the engine calls them one expert at a time,
so memory stays at one expert's weight. Export writes bf16: bridge does not quantise.
"""
from __future__ import annotations

from typing import Collection

import torch

BLOCKS, SCALES = "_blocks", "_scales"
BLOCK = 32
"""Values per scale."""
#: FP4 e2m1 code -> value: bit 3 the sign, bits 2-1 the exponent, bit 0 the mantissa (OCP MX spec, table 5).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127


def quantised_names(available: Collection[str], needed: Collection[str]) -> dict[str, tuple[str, str]]:
    """HF name -> its (blocks, scales) names, for every needed tensor the folder holds in MXFP4."""
    return {name: (name + BLOCKS, name + SCALES) for name in needed
            if name + BLOCKS in available and name + SCALES in available}


def stored_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(blocks, scales) shapes of an HF tensor of `shape` ([..., in, out]) stored in MXFP4: per row of out."""
    *stack, cols, rows = shape
    groups = -(-cols // BLOCK)
    return (*stack, rows, groups, BLOCK // 2), (*stack, rows, groups)


def dequantized_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape ([..., in, out]) that blocks of `blocks_shape` ([..., out, G, 16]) dequantise to."""
    *stack, rows, groups, _ = blocks_shape
    return (*stack, groups * BLOCK, rows)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`[..., rows, G, 16]` packed codes and `[..., rows, G]` exponents -> `[..., G * 32, rows]` in `dtype`.
    Every value is an FP4 value times a power of two: exact in fp64 for every exponent (2^128, scale 255, is not in
    fp32's range), then rounded once to `dtype` (exact in bf16 within its range)."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).to(torch.int32)  # [..., rows, G, 16, 2]
    values = torch.tensor(FP4_VALUES, dtype=torch.float64)[codes]
    exponents = scales.to(torch.float64) - E8M0_BIAS
    values = torch.ldexp(values, exponents[..., None, None])  # x * 2^e
    return values.flatten(-3).to(dtype).transpose(-1, -2)  # [..., rows, G * 32] -> [..., G * 32, rows]

