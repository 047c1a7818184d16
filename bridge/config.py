"""`ModelConfig`: the architecture hyper-parameters bridge needs, independent of HF or Megatron spelling."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from bridge.errors import BridgeError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (HF `rope_type: llama3`)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @property
    def megatron_expressible(self) -> bool:
        """Megatron Core fixes everything but the factor (see reference/megatron-format.md)."""
        return (self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings) == (1.0, 4.0, 8192)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A dense decoder-only transformer, described once for every format."""

    architecture: str
    """HF architecture class name, e.g. `LlamaForCausalLM`."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA groups); equal to `num_attention_heads` for MHA."""
    kv_channels: int
    """Per-head dimension; may differ from hidden/heads (Qwen3-0.6B: 128 vs 64)."""
    vocab_size: int
    """The HF (unpadded) vocabulary size."""
    max_position_embeddings: int
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    sliding_window: int | None = None
    params_dtype: str = "fp32"
    """Source dtype name (`fp32|bf16|fp16`)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_query_groups:
            raise BridgeError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_query_groups}; the config is inconsistent"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("extra")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        if data.get("rope_scaling"):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)


def megatron_args(cfg: ModelConfig, *, padded_vocab_size: int, tp: int, pp: int, vpp: int | None,
                  transformer_impl: str, dtype: str, divisible_by: int) -> argparse.Namespace:
    """The `args` namespace Megatron-LM stores in (and checks against) every checkpoint file."""
    scaling = cfg.rope_scaling
    return argparse.Namespace(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings,
        seq_length=min(cfg.max_position_embeddings, 4096),
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
        rotary_percent=1.0,
        use_rope_scaling=scaling is not None,
        rope_scaling_factor=scaling.factor if scaling else 8.0,
        normalization="RMSNorm",
        norm_epsilon=cfg.norm_epsilon,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        padded_vocab_size=padded_vocab_size,
        make_vocab_size_divisible_by=divisible_by,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=1,
        transformer_impl=transformer_impl,
        params_dtype=DTYPES[dtype],
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        ckpt_format="torch",
        tokenizer_type="HuggingFaceTokenizer",
        attention_dropout=0.0,
        hidden_dropout=0.0,
        window_size=(cfg.sliding_window, 0) if cfg.sliding_window else None,
        iteration=0,
        consumed_train_samples=0,
        consumed_valid_samples=0,
    )
