"""OLMo 2 (Olmo2ForCausalLM): Llama's tensors with the norms moved behind attention and the MLP (no pre-norm; HF's
`post_attention_layernorm` / `post_feedforward_layernorm`, under Gemma's Megatron-Bridge names), and q/k norms over
the whole q and k projections rather than per head."""
from __future__ import annotations

from typing import Any

from bridge.config import LayerSpec, ModelConfig
from bridge.mapping import COPY, FUSE_GATE_UP, FUSE_QKV, Row
from bridge.models.llama import ATTN, M_ATTN, M_MLP, MLP, config_from_hf as llama_config

LAYER = "model.layers.{}."


def rows(cfg: ModelConfig) -> list[Row]:
    """The mapping table: no pre-norm rows; the post-norms are `post_layernorm`s of linear_proj and linear_fc2."""
    table = [
        Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        Row(M_ATTN + "linear_qkv.weight", (ATTN + "q_proj.weight", ATTN + "k_proj.weight", ATTN + "v_proj.weight"), FUSE_QKV),
        Row(M_ATTN + "q_layernorm.weight", (ATTN + "q_norm.weight",)),
        Row(M_ATTN + "k_layernorm.weight", (ATTN + "k_norm.weight",)),
        Row(M_ATTN + "linear_proj.weight", (ATTN + "o_proj.weight",)),
        Row(M_ATTN + "linear_proj.post_layernorm.weight", (LAYER + "post_attention_layernorm.weight",)),
        Row(M_MLP + "linear_fc1.weight", (MLP + "gate_proj.weight", MLP + "up_proj.weight"), FUSE_GATE_UP),
        Row(M_MLP + "linear_fc2.weight", (MLP + "down_proj.weight",)),
        Row(M_MLP + "linear_fc2.post_layernorm.weight", (LAYER + "post_feedforward_layernorm.weight",)),
        Row("decoder.final_layernorm.weight", ("model.norm.weight",)),
        Row("output_layer.weight", ("lm_head.weight",), COPY),
    ]
    return [r for r in table if not (cfg.tie_word_embeddings and r.megatron == "output_layer.weight")]


def config_from_hf(hf: Any) -> ModelConfig:
    """Llama's reading (it refuses biases and other activations), then OLMo 2's block: post-norms only, norms that
    scale in fp32 before the cast, q/k norms over the whole projection."""
    return llama_config(hf).replace(
        layers=(LayerSpec(pre_norms=False, post_norms=True),) * hf.num_hidden_layers,
        norm_style="fp32-scale", qk_layernorm=True, qk_norm_full_width=True)
