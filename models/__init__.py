"""Architecture registry: HF architecture class name -> the family module that maps it, and the reading of an HF
`config.json` into bridge's ModelConfig through that family."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.hub import load_pretrained
from bridge.mapping import Conversion, Row, expand
from bridge.models import (deepseek, gemma, glm4_moe, gpt_oss, llama, mistral, mixtral, olmo2, phi3, qwen, qwen_moe,
                           smollm3)


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
    "Phi3ForCausalLM": Family("Phi3ForCausalLM", phi3.config_from_hf, phi3.rows),
    "SmolLM3ForCausalLM": Family("SmolLM3ForCausalLM", smollm3.config_from_hf, llama.rows),
    "Gemma2ForCausalLM": Family("Gemma2ForCausalLM", gemma.gemma2_config_from_hf, gemma.rows),
    "Gemma3ForCausalLM": Family("Gemma3ForCausalLM", gemma.gemma3_config_from_hf, gemma.rows),
    "Olmo2ForCausalLM": Family("Olmo2ForCausalLM", olmo2.config_from_hf, olmo2.rows),
    "DeepseekV3ForCausalLM": Family("DeepseekV3ForCausalLM", deepseek.config_from_hf, deepseek.rows, deepseek.hf_skip),
    "Glm4MoeForCausalLM": Family("Glm4MoeForCausalLM", glm4_moe.config_from_hf, glm4_moe.rows),
    "GptOssForCausalLM": Family("GptOssForCausalLM", gpt_oss.config_from_hf, gpt_oss.rows),
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


def load_hf_config(folder: Path) -> ModelConfig:
    """Read `config.json` (through transformers, so defaults match) into a ModelConfig."""
    from transformers import AutoConfig  # imported here: transformers takes seconds to import

    if not (folder / "config.json").is_file():
        raise BridgeError(f"{folder} has no config.json; give an HF model folder")
    try:
        hf = load_pretrained(AutoConfig, folder)
    except (ValueError, OSError, KeyError) as exc:
        raise BridgeError(f"cannot read {folder}/config.json: {str(exc).splitlines()[0]}") from exc
    architectures = getattr(hf, "architectures", None) or []
    if len(architectures) != 1:
        raise BridgeError(f"{folder}/config.json names architectures {architectures}; expected exactly one")
    return family(architectures[0]).config_from_hf(hf)
