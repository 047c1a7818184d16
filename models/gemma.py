"""Gemma 2 (Gemma2ForCausalLM) and Gemma 3's text model (Gemma3ForCausalLM): Llama's projections in a block with norms
before and after attention and the MLP, all of them (1 + w) RMSNorms whose w both formats store; GeGLU with tanh GELU;
the embedding scaled by sqrt(hidden); scores scaled by query_pre_attn_scalar ** -0.5; sliding and full layers
(`layer_types`). Gemma 2 soft-caps the attention scores and the logits; Gemma 3 has per-head q/k norms instead (and
caps the logits only where its config says so), and rotates its sliding layers with a local RoPE base. Megatron names are Megatron-Bridge's (gemma2_bridge.py,
gemma3_bridge.py)."""
from __future__ import annotations

from typing import Any, Callable

from bridge.config import LayerSpec, ModelConfig
from bridge.errors import BridgeError
from bridge.mapping import FUSE_GATE_UP, FUSE_QKV, Row
from bridge.models.llama import ATTN, M_ATTN, M_MLP, MLP, check_unsupported, common_fields

LAYER = "model.layers.{}."


def rows(cfg: ModelConfig) -> list[Row]:
    """The mapping table; the q/k norm rows only where the config has them (Gemma 3), the head only where untied."""
    table = [
        Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        Row(M_ATTN + "linear_qkv.layer_norm_weight", (LAYER + "input_layernorm.weight",)),
        Row(M_ATTN + "linear_qkv.weight", (ATTN + "q_proj.weight", ATTN + "k_proj.weight", ATTN + "v_proj.weight"), FUSE_QKV),
        Row(M_ATTN + "q_layernorm.weight", (ATTN + "q_norm.weight",)),
        Row(M_ATTN + "k_layernorm.weight", (ATTN + "k_norm.weight",)),
        Row(M_ATTN + "linear_proj.weight", (ATTN + "o_proj.weight",)),
        Row(M_ATTN + "linear_proj.post_layernorm.weight", (LAYER + "post_attention_layernorm.weight",)),
        Row(M_MLP + "linear_fc1.layer_norm_weight", (LAYER + "pre_feedforward_layernorm.weight",)),
        Row(M_MLP + "linear_fc1.weight", (MLP + "gate_proj.weight", MLP + "up_proj.weight"), FUSE_GATE_UP),
        Row(M_MLP + "linear_fc2.weight", (MLP + "down_proj.weight",)),
        Row(M_MLP + "linear_fc2.post_layernorm.weight", (LAYER + "post_feedforward_layernorm.weight",)),
        Row("decoder.final_layernorm.weight", ("model.norm.weight",)),
        Row("output_layer.weight", ("lm_head.weight",)),
    ]
    absent = {"q_layernorm.weight": not cfg.qk_layernorm, "k_layernorm.weight": not cfg.qk_layernorm,
              "output_layer.weight": cfg.tie_word_embeddings}
    return [r for r in table if not any(r.megatron.endswith(tail) and drop for tail, drop in absent.items())]


def _checked(hf: Any) -> None:
    """Refuse what would change the function if ignored."""
    check_unsupported(hf, {"attention_bias": "Megatron has no o_proj bias next to qkv bias",
                           "use_bidirectional_attention": "bridge's attention is causal"})
    if hf.hidden_activation != "gelu_pytorch_tanh":
        raise BridgeError(f"{hf.architectures[0]} with hidden_activation {hf.hidden_activation} is not supported; "
                          "supported: gelu_pytorch_tanh")


def _gemma_fields(hf: Any, **layer: Any) -> dict[str, Any]:
    """What Gemma 2 and 3 share: the layer specs (a window on the sliding layers) and the model-wide fields."""
    specs = tuple(LayerSpec(window=hf.sliding_window if kind == "sliding_attention" else None, post_norms=True,
                            activation="gelu_tanh", **{k: f(kind) for k, f in layer.items()})
                  for kind in hf.layer_types)
    return dict(layers=specs, norm_style="zero-centered", softmax_scale=hf.query_pre_attn_scalar ** -0.5,
                embedding_multiplier=hf.hidden_size ** 0.5)


def gemma2_config_from_hf(hf: Any) -> ModelConfig:
    _checked(hf)
    cap = hf.attn_logit_softcapping
    return ModelConfig(**common_fields(hf), **_gemma_fields(hf, attention_softcap=lambda kind: cap),
                       final_logit_softcap=hf.final_logit_softcapping)


#: Gemma 3's full-attention RoPE types -> the linear factor they divide positions by (transformers' rope_parameters).
GLOBAL_ROPE: dict[str, Callable[[dict[str, Any]], float]] = {
    "default": lambda params: 1.0, "linear": lambda params: float(params["factor"]),
}


def _gemma3_rope(hf: Any) -> dict[str, Any]:
    """Two RoPE tables: the full layers' (base 1M, maybe linearly scaled), the sliding layers' (base 10k, unscaled)."""
    full, local = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
    kind = full.get("rope_type", "default")
    if kind not in GLOBAL_ROPE or local.get("rope_type", "default") != "default":
        raise BridgeError(f"Gemma 3 with rope types {kind!r} (full layers) and {local.get('rope_type')!r} (sliding "
                          f"layers) is not supported; supported: {', '.join(GLOBAL_ROPE)} and default")
    return dict(rotary_base=float(full["rope_theta"]), rotary_linear_factor=GLOBAL_ROPE[kind](full),
                local_rotary_base=float(local["rope_theta"]))


def gemma3_config_from_hf(hf: Any) -> ModelConfig:
    _checked(hf)
    check_unsupported(hf, {"attn_logit_softcapping": "transformers' Gemma 3 attention does not apply it"})
    return ModelConfig(**common_fields(hf, rope=_gemma3_rope(hf)), qk_layernorm=True,
                       **_gemma_fields(hf, local_rope=lambda kind: kind == "sliding_attention"),
                       final_logit_softcap=hf.final_logit_softcapping)

