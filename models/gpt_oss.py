"""GPT-OSS (GptOssForCausalLM): attention with q/k/v/o biases and sinks, sliding windows on alternate layers, YaRN
RoPE, and an MoE block in every layer: a router with a bias, experts with biases and a clamped SwiGLU.

HF keeps each layer's experts in four stacked tensors: `gate_up_proj` [E, h, 2F] (in x out, gate and up in
alternate columns), `gate_up_proj_bias` [E, 2F] (alternate too), `down_proj` [E, F, h] (in x out) and
`down_proj_bias` [E, h]. Megatron keeps one linear_fc1 [gate; up] (out x in) and one linear_fc2 [h, F] per expert,
so each expert's rows read their index of the stacked tensors (`Row.stacked`), de-interleave and transpose.
The Hub's checkpoints hold the expert weights in MXFP4 (`*_blocks`, `*_scales`), dequantised to bf16 on import
(bridge.converters.mxfp4); export writes bf16.
"""
from __future__ import annotations

from typing import Any

import torch

from bridge.config import LayerSpec, ModelConfig, MoEConfig
from bridge.errors import BridgeError
from bridge.mapping import COPY, Row, Transform
from bridge.models.llama import ATTN, M_ATTN, M_MLP, MLP, attention_rows, common_fields

EXPERTS = MLP + "experts."
#: The sigmoid's gain in Megatron's quick_gelu, x * sigmoid(1.702 x), which GPT-OSS's activation is.
QUICK_GELU_ALPHA = 1.702
#: HF layer_types -> whether the layer attends within the sliding window.
LAYER_TYPES = {"sliding_attention": True, "full_attention": False}


def _gate_up_to_megatron(gate_up: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """One expert's gate_up_proj ([h, 2F], gate and up in alternate columns) or its bias ([2F], alternate entries)
    -> linear_fc1's [gate; up] ([2F, h] or [2F])."""
    rows = gate_up.t() if gate_up.dim() == 2 else gate_up  # [2F, h]: row 2j is gate j, row 2j + 1 up j
    return torch.cat([rows[0::2], rows[1::2]])


def _gate_up_to_hf(fc1: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    gate, up = fc1.chunk(2)
    rows = torch.stack([gate, up], dim=1).flatten(0, 1)  # [2F, ...]: gate j, up j, gate j + 1, ...
    return [rows.t().contiguous() if rows.dim() == 2 else rows]


def _down_to_megatron(down: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """One expert's down_proj [F, h] (in x out) -> linear_fc2 [h, F] (out x in)."""
    return down.t().contiguous()


def _down_to_hf(fc2: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return [fc2.t().contiguous()]


INTERLEAVED_GATE_UP = Transform("interleaved_gate_up", _gate_up_to_megatron, _gate_up_to_hf)
TRANSPOSED = Transform("transposed", _down_to_megatron, _down_to_hf)


def rows(cfg: ModelConfig) -> list[Row]:
    """Megatron-Bridge's names for GPT-OSS (gpt_oss_bridge.py): the sinks are core_attention's softmax_offset."""
    expert = dict(layers="moe", experts=True, stacked=True)
    return [
        Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        Row(M_ATTN + "core_attention.softmax_offset", (ATTN + "sinks",)),
        *attention_rows(cfg),  # with the qkv bias; linear_proj's weight last, its bias next (one module's rows in a run)
        Row(M_ATTN + "linear_proj.bias", (ATTN + "o_proj.bias",)),
        Row("decoder.layers.{}.pre_mlp_layernorm.weight", ("model.layers.{}.post_attention_layernorm.weight",), layers="moe"),
        Row(M_MLP + "router.weight", (MLP + "router.weight",), layers="moe"),
        Row(M_MLP + "router.bias", (MLP + "router.bias",), layers="moe"),
        Row(M_MLP + "experts.local_experts.{e}.linear_fc1.weight", (EXPERTS + "gate_up_proj",), INTERLEAVED_GATE_UP,
            **expert),
        Row(M_MLP + "experts.local_experts.{e}.linear_fc1.bias", (EXPERTS + "gate_up_proj_bias",), INTERLEAVED_GATE_UP,
            **expert),
        Row(M_MLP + "experts.local_experts.{e}.linear_fc2.weight", (EXPERTS + "down_proj",), TRANSPOSED, **expert),
        Row(M_MLP + "experts.local_experts.{e}.linear_fc2.bias", (EXPERTS + "down_proj_bias",), COPY, **expert),
        Row("decoder.final_layernorm.weight", ("model.norm.weight",)),
        *([] if cfg.tie_word_embeddings else [Row("output_layer.weight", ("lm_head.weight",))]),
    ]


def _layer_specs(hf: Any) -> tuple[LayerSpec, ...]:
    """The window on the sliding layers; every layer's experts apply x * sigmoid(1.702 x) to the gate, clamped to
    swiglu_limit, and multiply by the clamped up + 1 (GptOssExperts._apply_gate)."""
    unknown = sorted(set(hf.layer_types) - set(LAYER_TYPES))
    if unknown:
        raise BridgeError(f"GPT-OSS layer_types {unknown} are not supported; supported: {', '.join(LAYER_TYPES)}")
    return tuple(LayerSpec(window=hf.sliding_window if LAYER_TYPES[kind] else None, activation="quick_gelu",
                           glu_clamp=float(hf.swiglu_limit), glu_linear_offset=1.0) for kind in hf.layer_types)


def _check(hf: Any) -> None:
    """Refuse what would change the function if read as the rest of this family."""
    if not getattr(hf, "attention_bias", True):
        raise BridgeError("GPT-OSS with attention_bias=false is not supported: bridge gives its attention output "
                          "projection a bias whenever the experts have theirs (Megatron's add_bias_linear)")
    alpha = float(getattr(hf, "swiglu_alpha", QUICK_GELU_ALPHA))
    if alpha != QUICK_GELU_ALPHA:
        raise BridgeError(f"GPT-OSS with swiglu_alpha={alpha} is not supported: Megatron's quick_gelu fixes it at "
                          f"{QUICK_GELU_ALPHA}")
    quant = getattr(hf, "quantization_config", None) or {}
    method = (quant if isinstance(quant, dict) else quant.to_dict()).get("quant_method")
    if method not in (None, "mxfp4"):
        raise BridgeError(f"GPT-OSS quantised with {method} is not supported; supported: unquantised, mxfp4")


def config_from_hf(hf: Any) -> ModelConfig:
    _check(hf)
    fields = common_fields(hf)
    quantised = bool(getattr(hf, "quantization_config", None))
    if quantised and not (getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)):
        fields["params_dtype"] = "bf16"  # the Hub's config names no dtype: bf16 tensors, experts dequantised to bf16
    # no load-balancing loss, as Megatron-Bridge's GPT-OSS provider (moe_router_load_balancing_type none):
    # router_aux_loss_coef only counts in transformers with output_router_logits, which the released config leaves off
    moe = MoEConfig(num_experts=hf.num_local_experts, router_topk=hf.num_experts_per_tok,
                    moe_ffn_hidden_size=hf.intermediate_size, moe_layers=tuple(range(hf.num_hidden_layers)))
    return ModelConfig(**fields, add_qkv_bias=True, add_bias_linear=True, attention_sinks=True, moe=moe,
                       norm_style="fp32-scale", layers=_layer_specs(hf))
