"""Architecture registry: HF architecture class name -> the family module that maps it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.mapping import Row
from bridge.models import llama, mistral, qwen


@dataclass(frozen=True)
class Family:
    """What bridge knows about one HF architecture: its config reader and its mapping rows."""

    architecture: str
    config_from_hf: Callable[[Any], ModelConfig]
    rows: Callable[[ModelConfig], list[Row]]


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("LlamaForCausalLM", llama.config_from_hf, llama.rows),
    "MistralForCausalLM": Family("MistralForCausalLM", mistral.config_from_hf, llama.rows),
    "Qwen2ForCausalLM": Family("Qwen2ForCausalLM", qwen.qwen2_config_from_hf, llama.rows),
    "Qwen3ForCausalLM": Family("Qwen3ForCausalLM", qwen.qwen3_config_from_hf, llama.rows),
}


def family(architecture: str) -> Family:
    try:
        return FAMILIES[architecture]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise BridgeError(f"architecture {architecture} is not supported; supported: {supported}") from None
