"""Rotary position embeddings (non-interleaved, `rotate_half`), with Llama-3 frequency scaling, YaRN, LongRoPE and
partial rotary (the first `rotary_percent` of each head's dimensions rotate, the rest pass through).

Both transformers and Megatron Core rotate the two halves of each head; the cos/sin tables are
computed in fp32 and cast to the activation dtype, as transformers does, so bf16 runs agree too.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from bridge.config import ModelConfig, RopeScaling, YaRN


def inv_frequencies(dim: int, base: float, scaling: RopeScaling | None) -> torch.Tensor:
    """1 / base^(2i/dim) for i < dim/2, Llama-3-scaled when `scaling` is set (HF `_compute_llama3_parameters`)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_dim(cfg: ModelConfig) -> int:
    """How many of a head's dimensions rotate (transformers' int(head_dim * partial_rotary_factor))."""
    return int(cfg.kv_channels * cfg.rotary_percent)


def long_rope_frequencies(dim: int, base: float, factors: tuple[float, ...]) -> torch.Tensor:
    """LongRoPE's inv_freq: each of RoPE's frequencies divided by its factor."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base ** exponents)


class RotaryEmbedding(nn.Module):
    """Position ids -> (cos, sin) tables [s, b, 1, rotary dim]. `inv_freq` is a non-persistent buffer: not in the
    state dict, as in Megatron Core, where it is a plain attribute. LongRoPE keeps a second table, `long_inv_freq`,
    used for every position when the longest position id is past the original context (as transformers switches)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | None = None, local: bool = False) -> None:
        super().__init__()
        self.attention_scaling, self.long_rope = 1.0, cfg.long_rope
        if local:  # the local table of the layers whose spec says so (Gemma 3): its own base, no scaling
            inv_freq = inv_frequencies(rotary_dim(cfg), cfg.local_rotary_base, None)
        elif cfg.mla is not None:  # MLA: RoPE on the qk_pos_emb_head_dim part only, YaRN-scaled
            inv_freq, self.attention_scaling = yarn_frequencies(cfg)
        elif cfg.yarn is not None:
            inv_freq, self.attention_scaling = yarn_inv_freq(rotary_dim(cfg), cfg.rotary_base, cfg.yarn)
        elif cfg.long_rope is not None:
            dim, long = rotary_dim(cfg), cfg.long_rope
            inv_freq = long_rope_frequencies(dim, cfg.rotary_base, long.short_factor)
            long_inv_freq = long_rope_frequencies(dim, cfg.rotary_base, long.long_factor)
            self.register_buffer("long_inv_freq", long_inv_freq.to(device), persistent=False)
            self.attention_scaling = long.attention_factor
        else:  # HF's linear scaling divides the positions, here the frequencies: the same products
            inv_freq = inv_frequencies(rotary_dim(cfg), cfg.rotary_base, cfg.rope_scaling) / cfg.rotary_linear_factor
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.long_rope is None:
            return self.inv_freq
        beyond = position_ids.max() + 1 > self.long_rope.original_max_position_embeddings  # a tensor: no host sync
        return torch.where(beyond, self.long_inv_freq, self.inv_freq)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [b, s]
        freqs = position_ids.t().float().unsqueeze(-1) * self.frequencies(position_ids).float()  # [s, b, d/2]
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)  # [s, b, 1, d]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def yarn_mscale(scale: float, m: float = 1.0) -> float:
    """YaRN's attention-magnitude factor for a context `scale`-times longer (transformers' `get_mscale`)."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def yarn_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """inv_freq and the cos/sin factor for MLA's rope dims."""
    mla, dim = cfg.mla, cfg.mla.qk_pos_emb_head_dim
    if mla.rope_type != "yarn":
        return 1.0 / cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim), 1.0
    return yarn_inv_freq(dim, cfg.rotary_base, YaRN(
        factor=mla.rotary_scaling_factor, original_max_position_embeddings=mla.original_max_position_embeddings,
        beta_fast=mla.beta_fast, beta_slow=mla.beta_slow, mscale=mla.mscale, mscale_all_dim=mla.mscale_all_dim))


def yarn_inv_freq(dim: int, base: float, yarn: YaRN) -> tuple[torch.Tensor, float]:
    """YaRN's inv_freq for `dim` rotated dimensions and its cos/sin factor (transformers' `_compute_yarn_parameters`):
    below the correction range the frequencies keep their values (extrapolation), above it they are `factor` times
    slower (interpolation), linearly ramped between."""
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    factor, old_len = yarn.factor, yarn.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, yarn_attention_factor(yarn)


def yarn_attention_factor(yarn: YaRN) -> float:
    """The cos/sin scale: given, or from the factor (and the two mscales where both are set), as transformers."""
    if yarn.attention_factor is not None:
        return yarn.attention_factor
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return yarn_mscale(yarn.factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [s, b, heads, d]; cos/sin: [s, b, 1, r], r <= d: the first r dimensions rotate, the others pass."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)
