"""Qwen2-MoE (qkv bias, gated shared expert) and Qwen3-MoE (q/k norm): sparse layers every `decoder_sparse_step`."""
from __future__ import annotations

from typing import Any

from bridge.config import ModelConfig, MoEConfig
from bridge.mapping import FUSE_GATE_UP, FUSE_QKV, Row
from bridge.models.llama import routed_expert_rows, swiglu_mlp_rows, ATTN, M_ATTN, M_MLP, MLP, check_unsupported, common_fields
from bridge.models.qwen import _window


def rows(cfg: ModelConfig) -> list[Row]:
    """Dense layers (mlp_only_layers, off-step layers) keep Llama's MLP rows; MoE layers get router + experts."""
    table = [
        Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        Row(M_ATTN + "linear_qkv.layer_norm_weight", ("model.layers.{}.input_layernorm.weight",)),
        Row(M_ATTN + "linear_qkv.weight", (ATTN + "q_proj.weight", ATTN + "k_proj.weight", ATTN + "v_proj.weight"), FUSE_QKV),
        *([Row(M_ATTN + "linear_qkv.bias", (ATTN + "q_proj.bias", ATTN + "k_proj.bias", ATTN + "v_proj.bias"), FUSE_QKV)]
          if cfg.add_qkv_bias else []),
        *([Row(M_ATTN + "q_layernorm.weight", (ATTN + "q_norm.weight",)), Row(M_ATTN + "k_layernorm.weight", (ATTN + "k_norm.weight",))]
          if cfg.qk_layernorm else []),
        Row(M_ATTN + "linear_proj.weight", (ATTN + "o_proj.weight",)),
        # dense layers
        *swiglu_mlp_rows(layers="dense"),
        # MoE layers
        Row("decoder.layers.{}.pre_mlp_layernorm.weight", ("model.layers.{}.post_attention_layernorm.weight",), layers="moe"),
        Row(M_MLP + "router.weight", (MLP + "gate.weight",), layers="moe"),
        *routed_expert_rows(),
        Row("decoder.final_layernorm.weight", ("model.norm.weight",)),
        *([] if cfg.tie_word_embeddings else [Row("output_layer.weight", ("lm_head.weight",))]),
    ]
    if cfg.moe and cfg.moe.shared_expert_ffn_hidden_size:
        shared = [
            Row(M_MLP + "shared_experts.linear_fc1.weight",
                (MLP + "shared_expert.gate_proj.weight", MLP + "shared_expert.up_proj.weight"), FUSE_GATE_UP, layers="moe"),
            Row(M_MLP + "shared_experts.linear_fc2.weight", (MLP + "shared_expert.down_proj.weight",), layers="moe"),
            Row(M_MLP + "shared_experts.gate_weight", (MLP + "shared_expert_gate.weight",), layers="moe"),
        ]
        at = next(i for i, r in enumerate(table) if r.experts)
        table[at:at] = shared[:3 if cfg.moe.shared_expert_gate else 2]
    return table


def _moe(hf: Any, shared: int | None) -> MoEConfig:
    mlp_only = set(getattr(hf, "mlp_only_layers", None) or [])
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    layers = tuple(i for i in range(hf.num_hidden_layers) if i not in mlp_only and hf.num_experts > 0 and (i + 1) % step == 0)
    return MoEConfig(
        num_experts=hf.num_experts,
        router_topk=hf.num_experts_per_tok,
        moe_ffn_hidden_size=hf.moe_intermediate_size,
        moe_layers=layers,
        shared_expert_ffn_hidden_size=shared,
        shared_expert_gate=bool(shared),
        pre_softmax=not getattr(hf, "norm_topk_prob", False),  # softmax, top-k, no renormalisation
        aux_loss_coeff=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
    )


def qwen2_moe_config_from_hf(hf: Any) -> ModelConfig:
    shared = getattr(hf, "shared_expert_intermediate_size", 0) or None
    return ModelConfig(**common_fields(hf), add_qkv_bias=True, sliding_window=_window(hf), moe=_moe(hf, shared))


def qwen3_moe_config_from_hf(hf: Any) -> ModelConfig:
    check_unsupported(hf, {"attention_bias": "Megatron has no o_proj bias next to qkv bias"})
    return ModelConfig(**common_fields(hf), qk_layernorm=True, sliding_window=_window(hf), moe=_moe(hf, None))
