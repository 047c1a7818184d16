"""DeepSeek-V3 (and V2-style MLA): multi-head latent attention, first dense layers, sigmoid router with
score-correction bias and group-limited top-k, shared experts; FP8 block-quantised checkpoints.

Multi-token prediction (MTP): the HF checkpoint holds `num_nextn_predict_layers` extra layers
(`model.layers.{L}.*` for L = num_hidden_layers ...). transformers does not use them and bridge's model
has no MTP head, so import **skips** them: an explicit, logged, accounted-for skip list (`hf_skip`),
not a silent drop. Export therefore writes no MTP layer (transformers loads the result as it loads
the original). FP8 weights (`weight_scale_inv`, 128x128 blocks) are dequantised to bf16 on import.
"""
from __future__ import annotations

from typing import Any

from bridge.config import DTYPE_NAMES, MLAConfig, ModelConfig, MoEConfig
from bridge.errors import BridgeError
from bridge.mapping import FUSE_GATE_UP, Row
from bridge.models.llama import routed_expert_rows, swiglu_mlp_rows, M_ATTN, M_MLP, MLP, _as_dtype

ATTN = "model.layers.{}.self_attn."


def rows(cfg: ModelConfig) -> list[Row]:
    """TE-spec MLA names (reference/megatron-format.md): q/kv up-projections carry the fused a-layernorms."""
    q_rows = ([Row(M_ATTN + "linear_q_proj.weight", (ATTN + "q_proj.weight",))] if cfg.mla and cfg.mla.q_lora_rank is None else [
        Row(M_ATTN + "linear_q_down_proj.weight", (ATTN + "q_a_proj.weight",)),
        Row(M_ATTN + "linear_q_up_proj.layer_norm_weight", (ATTN + "q_a_layernorm.weight",)),
        Row(M_ATTN + "linear_q_up_proj.weight", (ATTN + "q_b_proj.weight",)),
    ])
    return [
        Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        Row("decoder.layers.{}.input_layernorm.weight", ("model.layers.{}.input_layernorm.weight",)),
        *q_rows,
        Row(M_ATTN + "linear_kv_down_proj.weight", (ATTN + "kv_a_proj_with_mqa.weight",)),
        Row(M_ATTN + "linear_kv_up_proj.layer_norm_weight", (ATTN + "kv_a_layernorm.weight",)),
        Row(M_ATTN + "linear_kv_up_proj.weight", (ATTN + "kv_b_proj.weight",)),
        Row(M_ATTN + "linear_proj.weight", (ATTN + "o_proj.weight",)),
        *mlp_rows(cfg),
        Row("decoder.final_layernorm.weight", ("model.norm.weight",)),
        *([] if cfg.tie_word_embeddings else [Row("output_layer.weight", ("lm_head.weight",))]),
    ]


def mlp_rows(cfg: ModelConfig) -> list[Row]:
    """Dense layers' SwiGLU MLP; MoE layers' router with its score-correction bias, shared experts and routed experts
    (DeepSeek-V3 and GLM-4.5 name them alike)."""
    return [
        *swiglu_mlp_rows(layers="dense"),
        Row("decoder.layers.{}.pre_mlp_layernorm.weight", ("model.layers.{}.post_attention_layernorm.weight",), layers="moe"),
        Row(M_MLP + "router.weight", (MLP + "gate.weight",), layers="moe"),
        *([Row(M_MLP + "router.expert_bias", (MLP + "gate.e_score_correction_bias",), layers="moe")]
          if cfg.moe.expert_bias else []),
        *([Row(M_MLP + "shared_experts.linear_fc1.weight",
               (MLP + "shared_experts.gate_proj.weight", MLP + "shared_experts.up_proj.weight"), FUSE_GATE_UP, layers="moe"),
           Row(M_MLP + "shared_experts.linear_fc2.weight", (MLP + "shared_experts.down_proj.weight",), layers="moe")]
          if cfg.moe.shared_expert_ffn_hidden_size else []),
        *routed_expert_rows(),
    ]


def hf_skip(cfg: ModelConfig) -> tuple[str, ...]:
    """The MTP layers' HF prefixes (see the module docstring)."""
    return tuple(f"model.layers.{cfg.num_layers + i}." for i in range(cfg.extra.get("num_nextn_predict_layers", 0)))


def moe_layers(hf: Any) -> tuple[int, ...]:
    """DeepSeek's rule (its reference modeling code): MoE from `first_k_dense_replace` on, every `moe_layer_freq`-th."""
    freq = getattr(hf, "moe_layer_freq", 1) or 1
    first = getattr(hf, "first_k_dense_replace", 0) or 0
    return tuple(i for i in range(hf.num_hidden_layers) if i >= first and i % freq == 0)


def moe_from_hf(hf: Any) -> MoEConfig:
    """DeepSeek-V3's MoE fields (GLM-4.5 has the same): sigmoid scores with the correction bias (`noaux_tc`),
    group-limited top-k, renormalised and scaled weights, shared experts of n_shared_experts x the expert width."""
    shared = getattr(hf, "n_shared_experts", 0) or 0
    return MoEConfig(
        num_experts=getattr(hf, "n_routed_experts", None) or getattr(hf, "num_local_experts"),
        router_topk=hf.num_experts_per_tok, moe_ffn_hidden_size=hf.moe_intermediate_size, moe_layers=moe_layers(hf),
        shared_expert_ffn_hidden_size=shared * hf.moe_intermediate_size or None,
        score_function=getattr(hf, "scoring_func", "sigmoid"),
        expert_bias=getattr(hf, "topk_method", "noaux_tc") == "noaux_tc",
        normalize_topk=bool(getattr(hf, "norm_topk_prob", True)),
        topk_scaling_factor=float(getattr(hf, "routed_scaling_factor", 1.0) or 1.0),
        num_groups=getattr(hf, "n_group", None), group_topk=getattr(hf, "topk_group", None),
        aux_loss_coeff=float(getattr(hf, "aux_loss_alpha", 0.0) or 0.0),
    )


def _mla(hf: Any) -> MLAConfig:
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise BridgeError(f"rope type {rope_type!r} is not supported for MLA; supported: default, yarn")
    yarn = rope_type == "yarn"
    return MLAConfig(
        q_lora_rank=getattr(hf, "q_lora_rank", None), kv_lora_rank=hf.kv_lora_rank, qk_head_dim=hf.qk_nope_head_dim,
        qk_pos_emb_head_dim=hf.qk_rope_head_dim, v_head_dim=hf.v_head_dim, rope_type="yarn" if yarn else "rope",
        rotary_scaling_factor=float(params.get("factor", 1.0)) if yarn else 1.0,
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 4096)),
        beta_fast=float(params.get("beta_fast", 32.0)), beta_slow=float(params.get("beta_slow", 1.0)),
        mscale=float(params.get("mscale", 1.0)), mscale_all_dim=float(params.get("mscale_all_dim", 0.0) or 0.0),
    )


def config_from_hf(hf: Any) -> ModelConfig:
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise BridgeError(f"hidden_act {hf.hidden_act} is not supported; Megatron's swiglu needs silu")
    if getattr(hf, "attention_bias", False):
        raise BridgeError("DeepSeek with attention_bias=true is not supported: Megatron's MLA has no biases")
    if getattr(hf, "rope_interleave", True) is False:
        raise BridgeError("DeepSeek with rope_interleave=false is not supported: Megatron's MLA de-interleaves RoPE dims")
    params = dict(getattr(hf, "rope_parameters", None) or {})
    moe = moe_from_hf(hf)
    mla = _mla(hf)
    quant = getattr(hf, "quantization_config", None) or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    cfg = ModelConfig(
        architecture=hf.architectures[0], num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size, num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_attention_heads, kv_channels=mla.qk_head_dim + mla.qk_pos_emb_head_dim,
        vocab_size=hf.vocab_size, max_position_embeddings=hf.max_position_embeddings, norm_epsilon=float(hf.rms_norm_eps),
        rotary_base=float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        params_dtype=DTYPE_NAMES.get(_as_dtype(dtype), "fp32"), moe=moe, mla=mla,
    )
    cfg.extra["num_nextn_predict_layers"] = int(getattr(hf, "num_nextn_predict_layers", 0) or 0)
    if quant.get("quant_method") == "fp8":
        cfg.extra["fp8_block"] = tuple(quant.get("weight_block_size") or (128, 128))
    return cfg
