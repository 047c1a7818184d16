"""Mistral: Llama's tensors and names, plus an optional sliding attention window."""
from __future__ import annotations

from typing import Any

from bridge.config import ModelConfig
from bridge.models.llama import common_fields, config_from_hf as llama_config


def config_from_hf(hf: Any) -> ModelConfig:
    cfg = llama_config(hf)
    window = getattr(hf, "sliding_window", None)
    if window and window < cfg.max_position_embeddings:
        return cfg.replace(sliding_window=int(window))
    return cfg


__all__ = ["config_from_hf", "common_fields"]
