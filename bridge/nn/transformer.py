"""One transformer layer (attention + SwiGLU MLP) under Megatron Core's module names, TE or local spec.

TE spec: the pre-attention / pre-MLP RMSNorms are fused into `linear_qkv` / `linear_fc1`
(`layer_norm_weight`) and the TE modules carry `_extra_state`. Local spec: separate
`input_layernorm` / `pre_mlp_layernorm`, no extra state (megatron/core/models/gpt/gpt_layer_specs.py).
"""
from __future__ import annotations

import torch
from torch import nn

from bridge.config import LLAMA_LAYER, LayerSpec, ModelConfig
from bridge.errors import BridgeError
from bridge.nn import rope_qkv
from bridge.nn.activations import gated
from bridge.nn.attention import Documents
from bridge.nn.core_attention import CoreAttention, TECoreAttention
from bridge.nn.layers import (ColumnParallelLinear, RMSNorm, RowParallelLinear, TEColumnParallelLinear, TENorm,
                              TERowParallelLinear, rms_norm)
from bridge.nn.mla import MLASelfAttention
from bridge.nn.moe import MoELayer
from bridge.nn.rope import apply_rope
from bridge.parallel import collectives as C
from bridge.parallel.state import ParallelState


class SelfAttention(nn.Module):
    """linear_qkv (query-group-interleaved fused QKV) -> q/k norm -> RoPE -> attention -> linear_proj."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, *, te: bool, sequence_parallel: bool,
                 dtype: torch.dtype, device: torch.device | None, spec: LayerSpec = LLAMA_LAYER,
                 window: int | None = None) -> None:
        super().__init__()
        tp = ps.tp
        self.rope = spec.rope  # False: a NoPE layer
        self.heads_per_group, self.groups, self.d = cfg.heads_per_group, cfg.num_query_groups // tp, cfg.kv_channels
        common = dict(tp=tp, group=ps.tp_group, sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        column, row = (TEColumnParallelLinear, TERowParallelLinear) if te else (ColumnParallelLinear, RowParallelLinear)
        self.linear_qkv = column(cfg.hidden_size, cfg.qkv_rows, bias=cfg.add_qkv_bias, norm_style=cfg.norm_style,
                                 norm_eps=cfg.norm_epsilon if te and spec.pre_norms else None, **common)
        self.core_attention = (TECoreAttention if te else CoreAttention)(
            window, cp=ps.cp, cp_rank=ps.cp_rank, cp_group=ps.cp_group, cp_comm_type=ps.cp_comm_type,
            softmax_scale=cfg.softmax_scale, softcap=spec.attention_softcap,
            sinks=cfg.num_attention_heads // tp if cfg.attention_sinks else 0, dtype=dtype, device=device)
        self.linear_proj = row(cfg.num_attention_heads * cfg.kv_channels, cfg.hidden_size, bias=cfg.add_bias_linear,
                               post_norm=(cfg.norm_epsilon, cfg.norm_style) if spec.post_norms else None, **common)
        self.q_layernorm = self.k_layernorm = None
        if cfg.qk_layernorm:
            q_width, k_width = ((cfg.num_attention_heads * self.d, cfg.num_query_groups * self.d)
                                if cfg.qk_norm_full_width else (self.d, self.d))
            norm = dict(dtype=dtype, device=device, style=cfg.norm_style)
            self.q_layernorm = RMSNorm(q_width, cfg.norm_epsilon, **norm)
            self.k_layernorm = RMSNorm(k_width, cfg.norm_epsilon, **norm)
        self.full_width_norm = cfg.qk_norm_full_width
        self.tp_group, self.tp, self.tp_rank = ps.tp_group, tp, ps.tp_rank

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                documents: Documents | None = None) -> torch.Tensor:
        qkv = self.linear_qkv(x)  # [s, b, ng/tp * (hpg + 2) * d]
        if self.q_layernorm is None and self.rope and rope[0].shape[-1] == self.d and rope_qkv.supported(qkv, self.d):
            q, k, v = rope_qkv.rope_qkv(qkv, *rope, self.groups, self.heads_per_group)  # one Triton kernel
        else:
            q, k, v = self.split_and_rotate(qkv, rope)
        out = self.core_attention(q, k, v, documents)  # [s, b, nq/tp, d]
        return self.linear_proj(out.flatten(2))  # [s(/tp), b, h]

    def split_and_rotate(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The plain form of `rope_qkv` (and the only one with q/k norms or without RoPE): q [s, b, nq/tp, d], k and v
        [s, b, ng/tp, d]."""
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.groups, (self.heads_per_group + 2) * self.d)
        q, k, v = qkv.split([self.heads_per_group * self.d, self.d, self.d], dim=-1)
        q = q.reshape(s, b, self.groups * self.heads_per_group, self.d)
        if self.q_layernorm is not None:
            norm = self._full_width_norm if self.full_width_norm else lambda t, module: module(t)
            q, k = norm(q, self.q_layernorm), norm(k, self.k_layernorm)
        if not self.rope:
            return q, k, v
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def _full_width_norm(self, t: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """OLMo 2's q/k norm over all heads' channels, [s, b, heads/tp, d]: each TP rank holds its heads, so the mean
        square is summed over TP (its backward sums too: every rank's output depends on every rank's input), and
        each rank applies its heads' slice of the full weight; that weight's gradient is the sum over TP of the
        slices' (Partial.HEADS)."""
        flat = t.flatten(2)  # [s, b, heads/tp * d]
        width = flat.shape[-1]
        square_sum = flat.float().pow(2).sum(-1, keepdim=True)
        square_sum = C.reduce_from_tp(C.copy_to_tp(square_sum, self.tp_group), self.tp_group)
        weight = norm.weight[self.tp_rank * width:(self.tp_rank + 1) * width]
        out = rms_norm(flat, weight, norm.eps, norm.style, mean_square=square_sum / (width * self.tp))
        return out.view_as(t)


class MLP(nn.Module):
    """Gated MLP: linear_fc1 holds [gate_r; up_r] for this TP rank; act(gate) * up -> linear_fc2 (SwiGLU, or GeGLU
    with tanh GELU for Gemma), with an optional norm on the output (LayerSpec.post_norms)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, *, te: bool, sequence_parallel: bool,
                 dtype: torch.dtype, device: torch.device | None, spec: LayerSpec = LLAMA_LAYER) -> None:
        super().__init__()
        if cfg.add_bias_linear:
            raise BridgeError(f"{cfg.architecture} with dense MLP layers and linear biases is not supported")
        common = dict(tp=ps.tp, group=ps.tp_group, sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        column, row = (TEColumnParallelLinear, TERowParallelLinear) if te else (ColumnParallelLinear, RowParallelLinear)
        self.linear_fc1 = column(cfg.hidden_size, 2 * cfg.ffn_hidden_size, norm_style=cfg.norm_style,
                                 norm_eps=cfg.norm_epsilon if te and spec.pre_norms else None, **common)
        self.linear_fc2 = row(cfg.ffn_hidden_size, cfg.hidden_size,
                              post_norm=(cfg.norm_epsilon, cfg.norm_style) if spec.post_norms else None, **common)
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)  # [s, b, F/tp] each
        return self.linear_fc2(gated(gate, up, self.spec))


class TransformerLayer(nn.Module):
    """Residual block: pre-norms, post-norms or both, as the layer's spec says (`cfg.layer(layer)`; post-norms sit
    inside linear_proj and linear_fc2). `forward` is a pure function of (hidden, rope, documents), so activation
    recomputation can wrap it (torch.utils.checkpoint) without knowing its insides.

    `layer` (global index) picks MoE vs dense MLP; MLA models use MLASelfAttention with a separate input norm.
    """

    def __init__(self, cfg: ModelConfig, ps: ParallelState, *, transformer_impl: str, sequence_parallel: bool,
                 dtype: torch.dtype, device: torch.device | None, layer: int = 0) -> None:
        super().__init__()
        te = transformer_impl == "transformer_engine"
        self.global_index = layer  # 0-based over the whole model (pipeline stages and virtual chunks)
        moe, mla, spec = cfg.is_moe_layer(layer), cfg.mla is not None, cfg.layer(layer)
        self.local_rope = spec.local_rope  # which RoPE table the block hands this layer
        norm = lambda: (TENorm if te else RMSNorm)(cfg.hidden_size, cfg.norm_epsilon, dtype=dtype, device=device,  # noqa: E731
                                                   style=cfg.norm_style)
        self.input_norm_separate = spec.pre_norms and (not te or mla)
        if self.input_norm_separate:
            self.input_layernorm = norm()
        kwargs = dict(te=te, sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        if mla:
            self.self_attention = MLASelfAttention(cfg, ps, **kwargs)
        else:
            self.self_attention = SelfAttention(cfg, ps, spec=spec, window=cfg.window(layer), **kwargs)
        self.pre_norm_separate = spec.pre_norms and (not te or moe)
        if self.pre_norm_separate:
            self.pre_mlp_layernorm = norm()
        if moe:
            self.mlp = MoELayer(cfg, ps, spec=spec, **kwargs)
        else:
            self.mlp = MLP(cfg, ps, spec=spec, **kwargs)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                documents: Documents | None = None) -> torch.Tensor:
        # x: [s(/tp), b, h]; documents: packed documents' boundaries (attention stays within each)
        h = self.input_layernorm(x) if self.input_norm_separate else x
        x = x + self.self_attention(h, rope, documents)
        h = self.pre_mlp_layernorm(x) if self.pre_norm_separate else x
        return x + self.mlp(h)
