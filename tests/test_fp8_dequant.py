"""FP8 block dequantisation (DeepSeek-V3 releases) against references that do not come from bridge.

The expected weights are the stored float8 bytes times their block's `weight_scale_inv`, written out index by
index (w[i, j] = q[i, j] * scale_inv[i // b0, j // b1]) and, where transformers has it, computed by transformers'
own FP8 block dequantisation; the quantised checkpoint is made by a quantiser written here, so it shares
nothing with `bridge.converters.fp8`. The blocks are not square and do not divide the weights, so a swap of
the two block dimensions or a mishandled partial edge block changes the result, and multiplying by the
scale's inverse (dividing) is off by orders of magnitude from the original weights.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bridge import api
from bridge.converters import fp8
from bridge.layout import ParallelLayout
from tests.test_convert_roundtrip import read_all

E4M3_MAX = 448.0


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's scheme, written for the tests: each b0 x b1 block (partial at the edges) scaled by its absmax
    to the e4m3 range; returns (float8 weight, float32 scale_inv [ceil(out/b0), ceil(in/b1)])."""
    b0, b1 = block
    out_dim, in_dim = weight.shape
    scale_inv = torch.empty(math.ceil(out_dim / b0), math.ceil(in_dim / b1), dtype=torch.float32)
    q = torch.empty(out_dim, in_dim, dtype=torch.float8_e4m3fn)
    for r in range(scale_inv.shape[0]):
        for c in range(scale_inv.shape[1]):
            tile = weight[r * b0:(r + 1) * b0, c * b1:(c + 1) * b1].float()
            scale_inv[r, c] = tile.abs().max().clamp(min=1e-12) / E4M3_MAX
            q[r * b0:(r + 1) * b0, c * b1:(c + 1) * b1] = (tile / scale_inv[r, c]).to(torch.float8_e4m3fn)
    return q, scale_inv


def dequantize_by_index(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w[i, j] = q[i, j] * scale_inv[i // b0, j // b1], in float32."""
    rows = torch.arange(q.shape[0]) // block[0]
    cols = torch.arange(q.shape[1]) // block[1]
    return q.float() * scale_inv[rows[:, None], cols[None, :]]


def transformers_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor | None:
    """transformers' FP8 block dequantisation (finegrained_fp8, CPU-capable) in float32; None where it has none."""
    try:
        from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    except ImportError:
        return None
    return _dequantize_fp8_weight(q, scale_inv, list(block), torch.float32)


def assert_within_fp8_rounding(dequantized: torch.Tensor, original: torch.Tensor, scale_inv: torch.Tensor,
                               block: tuple[int, int], name: str = "") -> None:
    """e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself, a subnormal (below 2^-6 of the
    scale range) by at most half its spacing 2^-9, i.e. 2^-10 x the block's scale."""
    step = dequantize_by_index(torch.ones(original.shape, dtype=torch.float8_e4m3fn), scale_inv, block)
    bound = original.float().abs() * 2.0 ** -4 + step * 2.0 ** -10
    error = (dequantized.float() - original.float()).abs()
    assert (error <= bound * 1.001 + 1e-30).all(), (name, (error - bound).max().item())


BLOCK = (8, 4)  # DeepSeek's 128 x 128 is square; 128 x 64 scaled down is not


def test_dequantize_is_q_times_its_own_blocks_scale() -> None:
    """29 x 19 with 8 x 4 blocks: 4 x 5 blocks, the last row and column of blocks partial (5 rows, 3 columns)."""
    gen = torch.Generator().manual_seed(0)
    original = torch.randn(29, 19, generator=gen) * 0.08
    original[::3] *= 7.0  # blocks of very different magnitude, so each block's scale is its own
    q, scale_inv = quantize_blocks(original, BLOCK)
    assert scale_inv.shape == (4, 5) and len(set(scale_inv.flatten().tolist())) == 20
    expected = dequantize_by_index(q, scale_inv, BLOCK)
    got = fp8.dequantize(q, scale_inv, BLOCK, dtype=torch.float32)
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert torch.equal(fp8.dequantize(q, scale_inv, BLOCK), expected.to(torch.bfloat16))  # bf16 by default
    theirs = transformers_dequantize(q, scale_inv, BLOCK)
    if theirs is not None:
        assert torch.equal(got, theirs), (got - theirs).abs().max()
    assert_within_fp8_rounding(got, original, scale_inv, BLOCK)


def test_dequantize_on_random_bytes_and_scales() -> None:
    """Any stored bytes and scales (not only those a quantiser makes): 19 x 29, blocks 4 x 8 the other way round."""
    gen = torch.Generator().manual_seed(1)
    block = (BLOCK[1], BLOCK[0])
    q = (torch.rand(19, 29, generator=gen) * 2 * E4M3_MAX - E4M3_MAX).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(5, 4, generator=gen) * 1e-3 + 1e-5
    got = fp8.dequantize(q, scale_inv, block, dtype=torch.float32)
    assert torch.equal(got, dequantize_by_index(q, scale_inv, block))
    theirs = transformers_dequantize(q, scale_inv, block)
    if theirs is not None:
        assert torch.equal(got, theirs)


IMPORT_BLOCK = (24, 20)  # leaves a partial block in both dimensions of most tiny DeepSeek-V3 projections


def test_import_dequantises_with_the_formula_and_gives_back_the_weights(tiny_hf, tmp_path: Path) -> None:
    """A tiny DeepSeek-V3 quantised here like the FP8 release: every imported projection (read back through
    export, which round-trip tests show is bit-exact) is the formula on the stored bytes, and the bf16 weights it
    was made from up to FP8 rounding."""
    src = tiny_hf("deepseek-v3", dtype=torch.bfloat16)
    original = read_all(src)
    stored: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    partial = 0
    for name, tensor in original.items():
        if tensor.dim() == 2 and "proj" in name:
            q, scale_inv = quantize_blocks(tensor, IMPORT_BLOCK)
            stored[name], stored[name + "_scale_inv"] = q, scale_inv
            expected[name] = dequantize_by_index(q, scale_inv, IMPORT_BLOCK).to(torch.bfloat16)
            partial += tensor.shape[0] % IMPORT_BLOCK[0] != 0 and tensor.shape[1] % IMPORT_BLOCK[1] != 0
        else:
            stored[name] = expected[name] = tensor
    assert partial >= 10  # the MLA, attention output and expert projections
    fp8_dir = tmp_path / "fp8"
    shutil.copytree(src, fp8_dir)
    (fp8_dir / "model.safetensors").unlink()
    save_file(stored, str(fp8_dir / "model.safetensors"))
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(IMPORT_BLOCK)}
    (fp8_dir / "config.json").write_text(json.dumps(config))

    ckpt = api.import_hf(fp8_dir, tmp_path / "m", ParallelLayout())
    out = read_all(api.export_hf(ckpt, tmp_path / "hf"))
    assert sorted(out) == sorted(expected)  # no scale tensors carried over
    for name, tensor in expected.items():
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], tensor), name
        if name + "_scale_inv" in stored:
            assert_within_fp8_rounding(out[name], original[name], stored[name + "_scale_inv"], IMPORT_BLOCK, name)
