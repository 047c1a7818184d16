"""Fixtures for tiny HF models made from the real configs in ../shared/configs, cached per session."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from bridge.tiny import save_tiny_model, tiny_config

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFIGS = SHARED / "configs"

#: The dense architectures of the conversion issue, one representative real config each.
DENSE_MODELS: dict[str, str] = {
    "llama32-tied": "meta-llama--Llama-3.2-1B",       # tied embeddings, llama3 rope scaling, head_dim 64
    "llama31": "meta-llama--Llama-3.1-8B",            # untied, llama3 rope scaling
    "llama2": "meta-llama--Llama-2-7b-hf",            # MHA, fp16 source
    "mistral": "mistralai--Mistral-7B-v0.3",
    "qwen2": "Qwen--Qwen2.5-7B",                      # qkv bias
    "qwen3": "Qwen--Qwen3-8B",                        # q/k norm
    "qwen3-tied": "Qwen--Qwen3-0.6B",                 # tied, head_dim > hidden/heads
}


#: Per-model overrides on top of bridge.tiny's scaled-down shapes.
MODEL_OVERRIDES: dict[str, dict[str, Any]] = {"llama2": {"num_key_value_heads": 8}}  # keep Llama 2's MHA


def real_config(name: str) -> Path:
    return CONFIGS / DENSE_MODELS.get(name, name) / "config.json"


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_hf("qwen3", dtype=torch.bfloat16, num_hidden_layers=8)` -> folder of a saved tiny model."""
    cache: dict[tuple[Any, ...], Path] = {}

    def make(name: str, dtype: torch.dtype = torch.float32, **overrides: Any) -> Path:
        key = (name, dtype, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"hf-{name}")
            config = tiny_config(real_config(name), **{**MODEL_OVERRIDES.get(name, {}), **overrides})
            cache[key] = save_tiny_model(config, out, dtype=dtype)
        return cache[key]

    return make
