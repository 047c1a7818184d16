"""Rotary position embeddings (non-interleaved, `rotate_half`), with Llama-3 frequency scaling.

Both transformers and Megatron Core rotate the two halves of each head; the cos/sin tables are
computed in fp32 and cast to the activation dtype, as transformers does, so bf16 runs agree too.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from bridge.config import ModelConfig, RopeScaling


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


class RotaryEmbedding(nn.Module):
    """Position ids -> (cos, sin) tables [s, b, 1, d]. `inv_freq` is a non-persistent buffer: not in the state dict,
    as in Megatron Core, where it is a plain attribute."""

    def __init__(self, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.attention_scaling = 1.0
        if cfg.mla is not None:  # MLA: RoPE on the qk_pos_emb_head_dim part only, YaRN-scaled
            inv_freq, self.attention_scaling = yarn_frequencies(cfg)
        else:
            inv_freq = inv_frequencies(cfg.kv_channels, cfg.rotary_base, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [b, s]
        freqs = position_ids.t().float().unsqueeze(-1) * self.inv_freq.float()  # [s, b, d/2]
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)  # [s, b, 1, d]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def yarn_mscale(scale: float, m: float = 1.0) -> float:
    """YaRN's attention-magnitude factor for a context `scale`-times longer (transformers' `get_mscale`)."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def yarn_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """inv_freq and the cos/sin factor for MLA's rope dims (transformers' `_compute_yarn_parameters`)."""
    mla, dim, base = cfg.mla, cfg.mla.qk_pos_emb_head_dim, cfg.rotary_base
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if mla.rope_type != "yarn":
        return 1.0 / pos_freqs, 1.0
    factor, old_len = mla.rotary_scaling_factor, mla.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(mla.beta_fast)), 0)
    high = min(math.ceil(correction_dim(mla.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    scaling = (yarn_mscale(factor, mla.mscale) / yarn_mscale(factor, mla.mscale_all_dim)
               if mla.mscale and mla.mscale_all_dim else yarn_mscale(factor))
    return inv_freq, scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [s, b, heads, d]; cos/sin: [s, b, 1, d]."""
    return x * cos + rotate_half(x) * sin
