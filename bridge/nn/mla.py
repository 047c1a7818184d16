"""Multi-head latent attention (DeepSeek-V2/V3) under Megatron Core's MLASelfAttention names (TE spec).

q = q_up(norm(q_down(x))) per head [nope | rope]; kv = kv_up(norm(kv_down(x)[:kv_lora])) per head [k_nope | v];
the shared k_rope = kv_down(x)[kv_lora:]. RoPE acts on the rope parts after de-interleaving them
(`x[..., 0::2] ++ x[..., 1::2]`), as both transformers (rope_interleave) and Megatron Core (MLA) do.
Down-projections are replicated over TP; up-projections are column parallel (whole heads per rank). With sequence
parallelism the down-projections run on this rank's sequence shard and the up-projections gather the sequence (as
every column-parallel input does), the shared k_rope is gathered alongside, and linear_proj reduce-scatters back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bridge.config import MLAConfig, ModelConfig
from bridge.nn.attention import Documents
from bridge.nn.core_attention import TECoreAttention
from bridge.nn.layers import ColumnParallelLinear, RowParallelLinear, TEColumnParallelLinear, TEExtraState, TERowParallelLinear
from bridge.nn.rope import apply_rope, yarn_mscale
from bridge.parallel import collectives as C
from bridge.parallel.state import ParallelState


class TELinear(TEExtraState, nn.Module):
    """TE's duplicated `TELinear`: a full (replicated) weight plus `_extra_state`."""

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def softmax_scale(mla: MLAConfig) -> float:
    scale = 1.0 / math.sqrt(mla.qk_head_dim + mla.qk_pos_emb_head_dim)
    if mla.rope_type == "yarn" and mla.mscale_all_dim:
        scale *= yarn_mscale(mla.rotary_scaling_factor, mla.mscale_all_dim) ** 2
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


class MLASelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, *, te: bool, sequence_parallel: bool, dtype: torch.dtype,
                 device: torch.device | None) -> None:
        super().__init__()
        mla, tp = cfg.mla, ps.tp
        self.mla, self.tp_group, self.heads = mla, ps.tp_group, cfg.num_attention_heads // tp
        self.sequence_parallel = sequence_parallel
        qd = mla.qk_head_dim + mla.qk_pos_emb_head_dim
        common = dict(tp=tp, group=ps.tp_group, sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        column, row = (TEColumnParallelLinear, TERowParallelLinear) if te else (ColumnParallelLinear, RowParallelLinear)
        if mla.q_lora_rank is None:
            self.linear_q_proj = column(cfg.hidden_size, cfg.num_attention_heads * qd, **common)
        else:
            self.linear_q_down_proj = TELinear(cfg.hidden_size, mla.q_lora_rank, dtype=dtype, device=device)
            self.linear_q_up_proj = column(mla.q_lora_rank, cfg.num_attention_heads * qd, norm_eps=cfg.norm_epsilon, **common)
        self.linear_kv_down_proj = TELinear(cfg.hidden_size, mla.kv_lora_rank + mla.qk_pos_emb_head_dim, dtype=dtype, device=device)
        self.linear_kv_up_proj = column(mla.kv_lora_rank, cfg.num_attention_heads * (mla.qk_head_dim + mla.v_head_dim),
                                        norm_eps=cfg.norm_epsilon, **common)
        self.core_attention = TECoreAttention(None, cp=ps.cp, cp_rank=ps.cp_rank, cp_group=ps.cp_group,
                                              cp_comm_type=ps.cp_comm_type, softmax_scale=softmax_scale(mla))
        self.linear_proj = row(cfg.num_attention_heads * mla.v_head_dim, cfg.hidden_size, **common)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                documents: Documents | None = None) -> torch.Tensor:
        # x: [s(/tp), b, h]; from the up-projections on, the whole sequence [s, b, ...]
        mla, n = self.mla, self.heads
        q = self.linear_q_proj(x) if mla.q_lora_rank is None else self.linear_q_up_proj(self.linear_q_down_proj(x))
        s, b = q.shape[:2]
        q = q.view(s, b, n, mla.qk_head_dim + mla.qk_pos_emb_head_dim)
        q_nope, q_pe = q.split([mla.qk_head_dim, mla.qk_pos_emb_head_dim], dim=-1)
        kv_a = self.linear_kv_down_proj(x)  # [s(/tp), b, kv_lora + d_rope]
        k_pass, k_pe = kv_a.split([mla.kv_lora_rank, mla.qk_pos_emb_head_dim], dim=-1)
        # shared by this rank's heads only: its gradient is summed over TP (reduce-scattered under SP)
        k_pe = C.gather_from_sp(k_pe, self.tp_group) if self.sequence_parallel else C.copy_to_tp(k_pe, self.tp_group)
        kv = self.linear_kv_up_proj(k_pass).view(s, b, n, mla.qk_head_dim + mla.v_head_dim)
        k_nope, v = kv.split([mla.qk_head_dim, mla.v_head_dim], dim=-1)
        q_pe = apply_rope(deinterleave(q_pe), *rope)
        k_pe = apply_rope(deinterleave(k_pe.unsqueeze(2)), *rope).expand(s, b, n, mla.qk_pos_emb_head_dim)
        q, k = torch.cat([q_nope, q_pe], -1), torch.cat([k_nope, k_pe], -1)  # [s, b, n, qd]
        out = self.core_attention(q, k, v, documents)  # [s, b, n, dv]; under CP over the whole sequence
        return self.linear_proj(out.reshape(s, b, n * mla.v_head_dim))
