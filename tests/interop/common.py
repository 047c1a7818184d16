"""What every interop test needs: the megatron-core skip marks and the real configs it builds tiny models from."""
from __future__ import annotations

import importlib.util

import pytest

from tests.model_fixtures import CONFIGS

MEGATRON_CORE_MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None,
                       reason="megatron-core not installed (pip install -r .ci/requirements-interop.txt)"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Megatron Core's GPTModel needs triton importable"),
]

#: Llama-3.2-1B: tied embeddings + llama3 RoPE with the values Megatron can express; Qwen2.5: qkv bias, untied;
#: Qwen3: qk-norm and head_dim != hidden/heads.
DENSE_MODELS = ("meta-llama--Llama-3.2-1B", "Qwen--Qwen2.5-7B", "Qwen--Qwen3-0.6B")

__all__ = ["CONFIGS", "DENSE_MODELS", "MEGATRON_CORE_MARKS"]
