"""Interop: Megatron Core's own MoE GPTModel (local spec, SequentialMLP, alltoall dispatcher) loads bridge's
Mixtral and Qwen3-MoE files strictly, at EP=1 and EP=2 (each EP rank its `mp_rank_00_00E` file), and gives
transformers' logits in fp32. Skipped without megatron-core and triton."""
from __future__ import annotations

from pathlib import Path

import pytest

from bridge.api import import_hf
from bridge.launch import launch
from bridge.layout import ParallelLayout
from bridge.verify import DEFAULT_PROMPTS, compare, encode, hf_logits
from tests.interop.common import MEGATRON_CORE_MARKS

pytestmark = MEGATRON_CORE_MARKS
MODELS = ("mixtral", "qwen3-moe")  # qwen3-moe alternates dense and MoE layers (decoder_sparse_step=2)


@pytest.mark.parametrize("ep", [1, 2])
def test_megatron_core_moe_matches_hf(tiny_hf, tmp_path: Path, ep: int) -> None:
    from tests.interop.megatron_moe_worker import megatron_moe_logits

    hf_dirs = [tiny_hf(name) for name in MODELS]
    ckpts = [str(import_hf(hf, tmp_path / name, ParallelLayout(ep=ep), transformer_impl="local"))
             for name, hf in zip(MODELS, hf_dirs)]
    tokens = encode(hf_dirs[0], DEFAULT_PROMPTS, 300)
    megatron = launch(megatron_moe_logits, ep, ckpts, tokens)[0]
    for name, hf, ours in zip(MODELS, hf_dirs, megatron):
        ref = hf_logits(hf, tokens, "fp32", "cpu")
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, ref, ours, "fp32")
        print(f"{name} ep={ep}: Megatron Core vs transformers max abs {overall.max_abs:.2e} top-1 {overall.top1:.0%}")
        assert passed, f"{name} at EP={ep}: Megatron Core's logits differ from transformers': {criterion}"
        assert overall.top1 == 1.0
