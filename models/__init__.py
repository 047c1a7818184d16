"""Architecture registry: HF architecture class name -> the family module that maps it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.mapping import Conversion, Row, expand
from bridge.models import deepseek, llama, mistral, mixtral, qwen, qwen_moe


@dataclass(frozen=True)
class Family:
    """What bridge knows about one HF architecture: its config reader and its mapping rows."""

    architecture: str
    config_from_hf: Callable[[Any], ModelConfig]
    rows: Callable[[ModelConfig], list[Row]]
    hf_skip: Callable[[ModelConfig], tuple[str, ...]] = lambda cfg: ()
    """Prefixes of HF tensors import deliberately does not convert (logged and accounted for)."""


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("LlamaForCausalLM", llama.config_from_hf, llama.rows),
    "MistralForCausalLM": Family("MistralForCausalLM", mistral.config_from_hf, llama.rows),
    "Qwen2ForCausalLM": Family("Qwen2ForCausalLM", qwen.qwen2_config_from_hf, llama.rows),
    "Qwen3ForCausalLM": Family("Qwen3ForCausalLM", qwen.qwen3_config_from_hf, llama.rows),
    "MixtralForCausalLM": Family("MixtralForCausalLM", mixtral.config_from_hf, mixtral.rows),
    "Qwen2MoeForCausalLM": Family("Qwen2MoeForCausalLM", qwen_moe.qwen2_moe_config_from_hf, qwen_moe.rows),
    "Qwen3MoeForCausalLM": Family("Qwen3MoeForCausalLM", qwen_moe.qwen3_moe_config_from_hf, qwen_moe.rows),
    "DeepseekV3ForCausalLM": Family("DeepseekV3ForCausalLM", deepseek.config_from_hf, deepseek.rows, deepseek.hf_skip),
}


def family(architecture: str) -> Family:
    try:
        return FAMILIES[architecture]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise BridgeError(f"architecture {architecture} is not supported; supported: {supported}") from None


def conversions(cfg: ModelConfig) -> list[Conversion]:
    """Every tensor conversion of a model: its family's rows expanded over layers (and experts)."""
    return list(expand(family(cfg.architecture).rows(cfg), cfg.num_layers, cfg.moe))
