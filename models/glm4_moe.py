"""GLM-4.5 and GLM-4.5-Air (Glm4MoeForCausalLM): Llama's attention with qkv bias, optional q/k norms and partial
rotary (the first half of each head rotates, in rotate_half pairing, as Megatron's rotary_percent), and DeepSeek-V3's
MoE (first_k_dense_replace dense layers, sigmoid router with score-correction bias and group-limited top-k, one
shared expert), under the same HF names as DeepSeek's MLP. Megatron-side names are Megatron-Bridge's
(`glm45_bridge.py`). The checkpoint's multi-token prediction layers are kept through conversion (bridge.models.mtp).
"""
from __future__ import annotations

from typing import Any

from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.mapping import Row
from bridge.models import mtp
from bridge.models.deepseek import mlp_rows, moe_from_hf
from bridge.models.llama import attention_rows, common_fields


def rows(cfg: ModelConfig) -> list[Row]:
    """Decoder rows, then the MTP layers' (between the final norm and the head, Megatron Core's module order)."""
    layer = [*attention_rows(cfg), *mlp_rows(cfg)]
    table = [
        Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        *layer,
        Row("decoder.final_layernorm.weight", ("model.norm.weight",)),
        *mtp.rows(cfg, layer),
        *([] if cfg.tie_word_embeddings else [Row("output_layer.weight", ("lm_head.weight",))]),
    ]
    return mtp.with_shared_copies(table, cfg)


def config_from_hf(hf: Any) -> ModelConfig:
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise BridgeError(f"hidden_act {hf.hidden_act} is not supported; Megatron's swiglu needs silu")
    mtp_layers = int(getattr(hf, "num_nextn_predict_layers", 0) or 0)
    if mtp_layers and getattr(hf, "first_k_dense_replace", 0) > hf.num_hidden_layers:
        raise BridgeError("GLM-4.5 with MTP layers but no MoE layer is not supported: its MTP layers are MoE layers")
    return ModelConfig(**common_fields(hf), add_qkv_bias=bool(getattr(hf, "attention_bias", False)),
                       qk_layernorm=bool(getattr(hf, "use_qk_norm", False)), moe=moe_from_hf(hf), mtp_layers=mtp_layers)
