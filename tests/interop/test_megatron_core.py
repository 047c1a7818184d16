"""Interop: Megatron Core's own GPTModel loads bridge's files (local spec, TP=2) and gives transformers' logits.

Skipped when megatron-core or triton is absent (install .ci/requirements-interop.txt). Transformer
Engine cannot be installed here, so the TE-spec names are checked against Megatron Core indirectly:
the local spec differs from them only by the norm renames that bridge.params declares (`ParamKind.local`).
"""
from __future__ import annotations

from pathlib import Path


from bridge.api import import_hf
from bridge.launch import launch
from bridge.layout import ParallelLayout
from bridge.apps.verify import DEFAULT_PROMPTS, compare, encode, hf_logits
from tests.interop.common import DENSE_MODELS, MEGATRON_CORE_MARKS

pytestmark = MEGATRON_CORE_MARKS
#: and SmolLM3 (NoPE layers: Megatron's no_rope_freq) and Phi-4 (HF's fused qkv_proj and gate_up_proj, GQA)
MODELS = (*DENSE_MODELS, "smollm3", "phi4")


def test_megatron_core_gpt_matches_hf(tiny_hf, tmp_path: Path) -> None:
    from tests.interop.megatron_worker import megatron_logits

    hf_dirs, ckpts = [], []
    for name in MODELS:
        hf = tiny_hf(name)
        hf_dirs.append(hf)
        ckpts.append(str(import_hf(hf, tmp_path / f"{name}-tp2", ParallelLayout(tp=2), transformer_impl="local")))
    tokens = encode(hf_dirs[0], DEFAULT_PROMPTS, 300)
    megatron = launch(megatron_logits, 2, ckpts, tokens)[0]
    for name, hf, ours in zip(MODELS, hf_dirs, megatron):
        ref = hf_logits(hf, tokens, "fp32", "cpu")
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, ref, ours, "fp32")
        assert passed, f"{name}: Megatron Core's logits differ from transformers': {criterion}"
        assert overall.top1 == 1.0
