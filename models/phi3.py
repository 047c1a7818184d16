"""Phi-3 and Phi-4 (Phi3ForCausalLM): the Llama block under HF names that fuse q, k and v (`qkv_proj`: [q; k; v])
and gate and up (`gate_up_proj`: [gate; up], already the order of Megatron's linear_fc1). LongRoPE (Phi-3.5's
`longrope`, once `su`) and partial rotary come through llama.rope_from_hf, the window through Mistral's reading."""
from __future__ import annotations

from typing import Any

import torch

from bridge import transforms
from bridge.config import ModelConfig
from bridge.mapping import Row, Transform
from bridge.models.llama import M_ATTN, M_MLP, check_unsupported
from bridge.models.mistral import config_from_hf as mistral_config

LAYER = "model.layers.{}."


def _qkv_to_megatron(qkv: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF qkv_proj [q; k; v] -> Megatron linear_qkv, grouped by query group."""
    d = cfg.kv_channels
    q, k, v = qkv.split([cfg.num_attention_heads * d, cfg.num_query_groups * d, cfg.num_query_groups * d])
    return transforms.fuse_qkv(q, k, v, cfg)


def _qkv_to_hf(qkv: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return [torch.cat(transforms.split_qkv(qkv, cfg))]


FUSED_QKV = Transform("fused_qkv", _qkv_to_megatron, _qkv_to_hf)


def rows(cfg: ModelConfig) -> list[Row]:
    """The mapping table (Megatron-Bridge's Megatron names for Phi-3 are Llama's)."""
    table = [
        Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        Row(M_ATTN + "linear_qkv.layer_norm_weight", (LAYER + "input_layernorm.weight",)),
        Row(M_ATTN + "linear_qkv.weight", (LAYER + "self_attn.qkv_proj.weight",), FUSED_QKV),
        Row(M_ATTN + "linear_proj.weight", (LAYER + "self_attn.o_proj.weight",)),
        Row(M_MLP + "linear_fc1.layer_norm_weight", (LAYER + "post_attention_layernorm.weight",)),
        Row(M_MLP + "linear_fc1.weight", (LAYER + "mlp.gate_up_proj.weight",)),
        Row(M_MLP + "linear_fc2.weight", (LAYER + "mlp.down_proj.weight",)),
        Row("decoder.final_layernorm.weight", ("model.norm.weight",)),
        Row("output_layer.weight", ("lm_head.weight",)),
    ]
    return [r for r in table if not (cfg.tie_word_embeddings and r.megatron == "output_layer.weight")]


def config_from_hf(hf: Any) -> ModelConfig:
    check_unsupported(hf, {"resid_pdrop": "bridge trains without dropout", "embd_pdrop": "bridge trains without dropout"})
    return mistral_config(hf)
