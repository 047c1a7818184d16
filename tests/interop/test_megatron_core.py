"""Interop: Megatron Core's own GPTModel loads bridge's files (local spec, TP=2) and gives transformers' logits.

Skipped when megatron-core or triton is absent (install .ci/requirements-interop.txt). Transformer
Engine cannot be installed here, so the TE-spec names are checked against Megatron Core indirectly:
the local spec differs from them only by the norm renames in bridge.sharding.LOCAL_SPEC_RENAMES.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bridge.api import import_hf
from bridge.launch import launch
from bridge.layout import ParallelLayout
from bridge.tiny import save_tiny_model, tiny_config
from bridge.verify import DEFAULT_PROMPTS, compare, encode, hf_logits

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None,
                       reason="megatron-core not installed (pip install -r .ci/requirements-interop.txt)"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Megatron Core's GPTModel needs triton importable"),
]

CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "configs"
#: Llama-3.2-1B: tied embeddings + llama3 RoPE scaling with the values Megatron can express; Qwen2: qkv bias;
#: Qwen3: qk-norm and head_dim != hidden/heads.
MODELS = ("meta-llama--Llama-3.2-1B", "Qwen--Qwen2.5-7B", "Qwen--Qwen3-0.6B")


def test_megatron_core_gpt_matches_hf(tmp_path: Path) -> None:
    from tests.interop.megatron_worker import megatron_logits

    hf_dirs, ckpts = [], []
    for name in MODELS:
        hf = save_tiny_model(tiny_config(CONFIGS / name / "config.json"), tmp_path / name)
        hf_dirs.append(hf)
        ckpts.append(str(import_hf(hf, tmp_path / f"{name}-tp2", ParallelLayout(tp=2), transformer_impl="local")))
    tokens = encode(hf_dirs[0], DEFAULT_PROMPTS, 300)
    megatron = launch(megatron_logits, 2, ckpts, tokens)[0]
    for name, hf, ours in zip(MODELS, hf_dirs, megatron):
        ref = hf_logits(hf, tokens, "fp32", "cpu")
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, ref, ours, "fp32")
        assert passed, f"{name}: Megatron Core's logits differ from transformers': {criterion}"
        assert overall.top1 == 1.0
