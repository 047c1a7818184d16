"""Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm): Llama's names with those two switches."""
from __future__ import annotations

from typing import Any

from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.models.llama import check_unsupported, common_fields


def _window(hf: Any) -> int | None:
    """Qwen configs carry `sliding_window` even when `use_sliding_window` is false: only the flag counts."""
    if getattr(hf, "use_sliding_window", False):
        raise BridgeError("Qwen sliding-window attention (use_sliding_window=true) is not supported")
    return None


def qwen2_config_from_hf(hf: Any) -> ModelConfig:
    return ModelConfig(**common_fields(hf), add_qkv_bias=True, sliding_window=_window(hf))


def qwen3_config_from_hf(hf: Any) -> ModelConfig:
    check_unsupported(hf, {"attention_bias": "Megatron has no o_proj bias next to qkv bias"})
    return ModelConfig(**common_fields(hf), qk_layernorm=True, sliding_window=_window(hf))
