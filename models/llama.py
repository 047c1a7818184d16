"""Llama family (Llama 2/3/3.1/3.2): HF config -> ModelConfig, and the HF <-> Megatron mapping rows.

Mistral, Qwen2 and Qwen3 share these HF names; their modules only read their configs, and the rows
below switch on the config's qkv bias / qk-norm flags.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from bridge.config import DTYPE_NAMES, LongRope, ModelConfig, RopeScaling, YaRN
from bridge.errors import BridgeError
from bridge.mapping import COPY, FUSE_GATE_UP, FUSE_QKV, Row

ATTN = "model.layers.{}.self_attn."
MLP = "model.layers.{}.mlp."
M_ATTN = "decoder.layers.{}.self_attention."
M_MLP = "decoder.layers.{}.mlp."


def rows(cfg: ModelConfig) -> list[Row]:
    """The mapping table. Megatron's TE-spec names; the local spec is a rename applied later."""
    return [
        Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        *attention_rows(cfg),
        *swiglu_mlp_rows(),
        Row("decoder.final_layernorm.weight", ("model.norm.weight",)),
        *([] if cfg.tie_word_embeddings else [Row("output_layer.weight", ("lm_head.weight",), COPY)]),
    ]


def attention_rows(cfg: ModelConfig) -> list[Row]:
    """Llama's attention with its fused input norm, and the qkv bias and q/k norms where the config has them (Qwen,
    GLM-4.5)."""
    table = [
        Row(M_ATTN + "linear_qkv.layer_norm_weight", ("model.layers.{}.input_layernorm.weight",)),
        Row(M_ATTN + "linear_qkv.weight", (ATTN + "q_proj.weight", ATTN + "k_proj.weight", ATTN + "v_proj.weight"), FUSE_QKV),
        Row(M_ATTN + "linear_qkv.bias", (ATTN + "q_proj.bias", ATTN + "k_proj.bias", ATTN + "v_proj.bias"), FUSE_QKV),
        Row(M_ATTN + "q_layernorm.weight", (ATTN + "q_norm.weight",)),
        Row(M_ATTN + "k_layernorm.weight", (ATTN + "k_norm.weight",)),
        Row(M_ATTN + "linear_proj.weight", (ATTN + "o_proj.weight",)),
    ]
    absent = {
        "linear_qkv.bias": not cfg.add_qkv_bias,
        "q_layernorm.weight": not cfg.qk_layernorm,
        "k_layernorm.weight": not cfg.qk_layernorm,
    }
    return [r for r in table if not any(r.megatron.endswith(tail) and drop for tail, drop in absent.items())]


def swiglu_mlp_rows(layers: str = "all") -> list[Row]:
    """The dense SwiGLU MLP with its fused pre-MLP norm: HF's gate/up/down under `mlp.` (Llama, Qwen, DeepSeek)."""
    return [
        Row(M_MLP + "linear_fc1.layer_norm_weight", ("model.layers.{}.post_attention_layernorm.weight",), layers=layers),
        Row(M_MLP + "linear_fc1.weight", (MLP + "gate_proj.weight", MLP + "up_proj.weight"), FUSE_GATE_UP, layers=layers),
        Row(M_MLP + "linear_fc2.weight", (MLP + "down_proj.weight",), layers=layers),
    ]


def routed_expert_rows() -> list[Row]:
    """Routed experts named like the dense MLP (`mlp.experts.{e}.gate_proj` ...): Qwen-MoE and DeepSeek."""
    return [
        Row(M_MLP + "experts.local_experts.{e}.linear_fc1.weight",
            (MLP + "experts.{e}.gate_proj.weight", MLP + "experts.{e}.up_proj.weight"), FUSE_GATE_UP, layers="moe",
            experts=True),
        Row(M_MLP + "experts.local_experts.{e}.linear_fc2.weight", (MLP + "experts.{e}.down_proj.weight",), COPY,
            layers="moe", experts=True),
    ]


def rope_from_hf(hf: Any) -> dict[str, Any]:
    """ModelConfig's RoPE fields from either transformers 5 (`rope_parameters`) or 4 (`rope_theta`/`rope_scaling`):
    the base, the rotated fraction of a head and the type's own parameters (ROPE_TYPES)."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise BridgeError(f"rope type {rope_type!r} is not supported for {hf.architectures}; supported: "
                          f"{', '.join(ROPE_TYPES)}")
    fraction = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None)) or 1.0
    return dict(rotary_base=float(params.get("rope_theta", 10000.0)), rotary_percent=float(fraction),
                **ROPE_TYPES[rope_type](hf, params))


def _llama3(hf: Any, params: dict[str, Any]) -> dict[str, Any]:
    return dict(rope_scaling=RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    ))


def _long_rope(hf: Any, params: dict[str, Any]) -> dict[str, Any]:
    """As transformers computes it: the default attention factor comes from max / original positions."""
    original = int(params.get("original_max_position_embeddings") or hf.original_max_position_embeddings)
    factor = params.get("factor") or hf.max_position_embeddings / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return dict(long_rope=LongRope(short_factor=params["short_factor"], long_factor=params["long_factor"],
                                   original_max_position_embeddings=original, attention_factor=float(attention)))


def _yarn(hf: Any, params: dict[str, Any]) -> dict[str, Any]:
    """As transformers reads it: no factor means max / original positions; `truncate` defaults to true."""
    original = int(params["original_max_position_embeddings"])
    optional = {key: float(params[key]) for key in ("mscale", "mscale_all_dim", "attention_factor")
                if params.get(key) is not None}
    return dict(yarn=YaRN(factor=float(params.get("factor") or hf.max_position_embeddings / original),
                          original_max_position_embeddings=original, beta_fast=float(params.get("beta_fast") or 32),
                          beta_slow=float(params.get("beta_slow") or 1), truncate=bool(params.get("truncate", True)),
                          **optional))


#: HF rope_type -> the ModelConfig fields it sets besides the base (`su`: LongRoPE's first name, as transformers reads).
ROPE_TYPES: dict[str, Callable[[Any, dict[str, Any]], dict[str, Any]]] = {
    "default": lambda hf, params: {}, "llama3": _llama3, "longrope": _long_rope, "su": _long_rope, "yarn": _yarn,
}


def common_fields(hf: Any, rope: dict[str, Any] | None = None) -> dict[str, Any]:
    """ModelConfig fields every Llama-like HF config spells the same way; `rope`: the RoPE fields where the family
    reads them itself (Gemma 3's per-layer-type rope_parameters)."""
    heads = hf.num_attention_heads
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    return dict(
        architecture=hf.architectures[0],
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf, "num_key_value_heads", None) or heads,
        kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings,
        norm_epsilon=float(hf.rms_norm_eps),
        **(rope_from_hf(hf) if rope is None else rope),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        params_dtype=DTYPE_NAMES.get(_as_dtype(dtype), "fp32"),
    )


def _as_dtype(value: Any) -> Any:
    import torch

    return getattr(torch, value) if isinstance(value, str) else value


def check_unsupported(hf: Any, flags: dict[str, str]) -> None:
    """Refuse HF options that would silently change the function if ignored."""
    for attr, why in flags.items():
        if getattr(hf, attr, None):
            raise BridgeError(f"{hf.architectures[0]} with {attr}={getattr(hf, attr)} is not supported: {why}")


def config_from_hf(hf: Any) -> ModelConfig:
    check_unsupported(hf, {
        "attention_bias": "Megatron has no o_proj bias next to qkv bias",
        "mlp_bias": "Megatron's SwiGLU MLP has no biases",
    })
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise BridgeError(f"hidden_act {hf.hidden_act} is not supported; Megatron's swiglu needs silu")
    return ModelConfig(**common_fields(hf))
