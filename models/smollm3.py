"""SmolLM3: Llama's tensors and names, with NoPE layers (HF `no_rope_layers`: 0 = this layer rotates nothing)."""
from __future__ import annotations

from typing import Any

from bridge.config import LayerSpec, ModelConfig
from bridge.errors import BridgeError
from bridge.models.llama import config_from_hf as llama_config


def config_from_hf(hf: Any) -> ModelConfig:
    if getattr(hf, "use_sliding_window", False):
        raise BridgeError("SmolLM3 with use_sliding_window=true is not supported: its windows are per layer")
    return llama_config(hf).replace(layers=tuple(LayerSpec(rope=bool(flag)) for flag in hf.no_rope_layers))
