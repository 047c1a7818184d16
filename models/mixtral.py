"""Mixtral: Llama attention and a sparse MoE block (softmax top-k router, SwiGLU experts w1/w3/w2) in every layer."""
from __future__ import annotations

from typing import Any

from bridge.config import ModelConfig, MoEConfig
from bridge.errors import BridgeError
from bridge.mapping import COPY, FUSE_GATE_UP, FUSE_QKV, Row
from bridge.models.llama import ATTN, M_ATTN, M_MLP, check_unsupported, common_fields

MOE = "model.layers.{}.block_sparse_moe."


def rows(cfg: ModelConfig) -> list[Row]:
    """Megatron TE-spec names; `{e}` is the global expert index (the layout places it on an EP rank)."""
    return [
        Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        Row(M_ATTN + "linear_qkv.layer_norm_weight", ("model.layers.{}.input_layernorm.weight",)),
        Row(M_ATTN + "linear_qkv.weight", (ATTN + "q_proj.weight", ATTN + "k_proj.weight", ATTN + "v_proj.weight"), FUSE_QKV),
        Row(M_ATTN + "linear_proj.weight", (ATTN + "o_proj.weight",)),
        Row("decoder.layers.{}.pre_mlp_layernorm.weight", ("model.layers.{}.post_attention_layernorm.weight",), layers="moe"),
        Row(M_MLP + "router.weight", (MOE + "gate.weight",), layers="moe"),
        Row(M_MLP + "experts.local_experts.{e}.linear_fc1.weight", (MOE + "experts.{e}.w1.weight", MOE + "experts.{e}.w3.weight"),
            FUSE_GATE_UP, layers="moe", experts=True),
        Row(M_MLP + "experts.local_experts.{e}.linear_fc2.weight", (MOE + "experts.{e}.w2.weight",), COPY,
            layers="moe", experts=True),
        Row("decoder.final_layernorm.weight", ("model.norm.weight",)),
        *([] if cfg.tie_word_embeddings else [Row("output_layer.weight", ("lm_head.weight",))]),
    ]


def config_from_hf(hf: Any) -> ModelConfig:
    check_unsupported(hf, {"attention_bias": "Megatron has no o_proj bias next to qkv bias"})
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise BridgeError(f"hidden_act {hf.hidden_act} is not supported; Megatron's swiglu needs silu")
    fields = common_fields(hf)
    window = getattr(hf, "sliding_window", None)
    moe = MoEConfig(
        num_experts=hf.num_local_experts,
        router_topk=hf.num_experts_per_tok,
        moe_ffn_hidden_size=hf.intermediate_size,
        moe_layers=tuple(range(hf.num_hidden_layers)),
        aux_loss_coeff=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
    )
    return ModelConfig(**fields, moe=moe,
                       sliding_window=int(window) if window and window < fields["max_position_embeddings"] else None)
