"""Tiny random HF models built from real configs scaled down: for the demo, tests and benchmarks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

#: Scaled-down shapes that keep each family's distinctive features (GQA, head_dim != hidden/heads, ...).
TINY_OVERRIDES: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, vocab_size=300, max_position_embeddings=256,
)


def tiny_config(real_config: Path | dict[str, Any], **overrides: Any):  # noqa: ANN201 - a transformers config
    """A transformers config from a real `config.json`, with shapes scaled down."""
    from transformers import AutoConfig

    data = json.loads(Path(real_config).read_text()) if not isinstance(real_config, dict) else dict(real_config)
    data.update(TINY_OVERRIDES)
    if "head_dim" in data:
        data["head_dim"] = 16
    data.update(overrides)
    data.pop("_name_or_path", None)
    for key, fallback in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", None)):
        if isinstance(data.get(key), int) and data[key] >= data["vocab_size"]:
            data[key] = fallback
    config_cls = AutoConfig.for_model(data["model_type"]).__class__
    return config_cls(**{k: v for k, v in data.items() if k != "model_type"})


def save_tiny_model(config: Any, out: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Random weights (non-trivial norms too) saved with `save_pretrained` as safetensors."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith((".bias", "_bias")):
                # Norms start at 1 and biases at 0: random values make layout mistakes visible.
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith(".sinks"):  # attention sinks start near 0; trained ones are logits of order one
                param.copy_(torch.randn_like(param))
    model = model.to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    return out
