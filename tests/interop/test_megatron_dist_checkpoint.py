"""Interop for torch_dist: Megatron Core's own `dist_checkpointing` loads bridge's folder, and bridge reads its save.

- bridge writes torch_dist (padding for TP=1); Megatron Core builds a local-spec GPTModel at TP=1 and at
  TP=2 (gloo, CPU), fills its sharded state dict with `dist_checkpointing.load(strict=RAISE_ALL)`, and its
  logits match transformers'.
- The TP=2 run saves the model again with `dist_checkpointing.save` (per-rank chunks, fc1 as separate
  gate/up chunks, vocab padded for TP=2); `bridge export` of that folder gives the HF weights bit for bit.
- Training checkpoints (2 steps at DP=2 with the distributed optimizer): Megatron Core at TP=2 loads the model
  of a `--ckpt-format torch_dist` one (model keys strict, the optimizer and RNG keys left), and its GPTModel
  the `model` of a legacy one's `model_optim_rng.pt`; both give the logits of what `bridge export` makes of them.
Skipped when megatron-core or triton is absent (install .ci/requirements-interop.txt).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bridge.api import export_hf, import_hf
from bridge.launch import launch
from bridge.layout import ParallelLayout
from bridge.apps.verify import DEFAULT_PROMPTS, compare, encode, hf_logits
from tests.interop.common import DENSE_MODELS, MEGATRON_CORE_MARKS
from tests.test_convert_roundtrip import assert_identical

pytestmark = MEGATRON_CORE_MARKS
MODELS = DENSE_MODELS


@pytest.fixture(scope="module")
def written(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[str]]:
    tmp = tmp_path_factory.mktemp("dist-interop")
    hf_dirs = [tiny_hf(name) for name in MODELS]
    ckpts = [str(import_hf(hf, tmp / f"{name}-dist", ParallelLayout(), format="torch_dist")) for name, hf in zip(MODELS, hf_dirs)]
    return tmp, hf_dirs, ckpts


def _assert_logits_match(hf_dirs: list[Path], tokens: list[list[int]], megatron: list[list]) -> None:
    for name, hf, ours in zip(MODELS, hf_dirs, megatron):
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, hf_logits(hf, tokens, "fp32", "cpu"), ours, "fp32")
        assert passed, f"{name}: Megatron Core's logits differ from transformers': {criterion}"
        assert overall.top1 == 1.0


def test_megatron_core_loads_bridge_torch_dist_tp1(written) -> None:
    from tests.interop.megatron_dist_worker import dist_logits

    _, hf_dirs, ckpts = written
    tokens = encode(hf_dirs[0], DEFAULT_PROMPTS, 300)
    _assert_logits_match(hf_dirs, tokens, launch(dist_logits, 1, ckpts, tokens)[0])


def test_megatron_core_tp2_load_and_its_own_save_round_trip(written) -> None:
    from tests.interop.megatron_dist_worker import dist_logits

    tmp, hf_dirs, ckpts = written
    tokens = encode(hf_dirs[0], DEFAULT_PROMPTS, 300)
    saved = [tmp / f"{Path(c).name}-mcore-save" for c in ckpts]
    _assert_logits_match(hf_dirs, tokens, launch(dist_logits, 2, ckpts, tokens, [str(s) for s in saved])[0])
    for name, hf, ckpt, save in zip(MODELS, hf_dirs, ckpts, saved):
        folder = tmp / f"{name}-from-megatron"  # bridge.json + hf_meta from ours, the iteration folder from Megatron
        shutil.copytree(ckpt, folder)
        shutil.rmtree(folder / "release")
        shutil.copytree(save, folder / "release")
        assert_identical(hf, export_hf(folder, tmp / f"{name}-from-megatron-hf"))


def test_megatron_core_reads_the_model_of_training_checkpoints(tiny_hf, tmp_path: Path) -> None:
    from bridge.training import TrainConfig, train
    from tests.interop.megatron_dist_worker import training_logits
    from tests.model_fixtures import write_random_corpus

    hf = tiny_hf(MODELS[0])
    data = write_random_corpus(tmp_path / "corpus", seed=1, documents=40)
    runs = {}
    for fmt, impl in (("torch_dist", "transformer_engine"), ("torch", "local")):
        run = runs[fmt] = tmp_path / f"run-{fmt}"
        summary = train(TrainConfig(
            load=str(import_hf(hf, tmp_path / f"ckpt-{impl}", transformer_impl=impl)), data_path=[str(data)],
            micro_batch_size=2, global_batch_size=4, seq_length=32, train_iters=2, lr=1e-2, eval_interval=0,
            eval_iters=1, progress=False, save=str(run), nproc=2, device="cpu", ckpt_format=fmt, use_distributed_optimizer=True))
        assert summary["iterations"] == 2
    tokens = encode(hf, DEFAULT_PROMPTS, 300)
    megatron = launch(training_logits, 2, str(runs["torch_dist"]), str(runs["torch"]), tokens)[0]
    for fmt, ours in zip(runs, megatron):
        exported = hf_logits(export_hf(runs[fmt], tmp_path / f"{fmt}-hf"), tokens, "fp32", "cpu")
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, exported, ours, "fp32")
        assert passed and overall.top1 == 1.0, f"{fmt}: Megatron Core's logits differ from the export's: {criterion}"
        moved = max((a - b).abs().max().item() for a, b in zip(hf_logits(hf, tokens, "fp32", "cpu"), ours))
        assert moved > 1e3 * overall.max_abs, f"{fmt}: Megatron Core read the imported weights, not the trained ones"
