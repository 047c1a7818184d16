"""Exact resume, crash-safe checkpoints, SIGTERM, and a training checkpoint that exports, loads and verifies."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bridge.api import export_hf, import_hf
from bridge.converters.megatron_legacy import TRACKER, read_tracker
from bridge.launch import launch
from bridge.training import TrainConfig, train
from tests.model_fixtures import load_pt, write_random_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    hf = tiny_hf("llama31")  # untied
    ckpt = import_hf(hf, root / "ckpt")
    return {"root": root, "ckpt": ckpt, "data": write_random_corpus(root / "corpus", seed=1, documents=60), "hf": hf}


def config(setup: dict[str, Path], save: str, **kw: object) -> TrainConfig:
    base = dict(load=str(setup["ckpt"]), data_path=[str(setup["data"])], micro_batch_size=2, global_batch_size=8,
                seq_length=32, train_iters=10, lr=1e-3, lr_warmup_iters=2, eval_interval=4, eval_iters=1,
                progress=False, save=str(setup["root"] / save), nproc=2, pp=2, device="cpu")
    return TrainConfig(**{**base, **kw})


def rank_file(run: Path, iteration: int, rank: str) -> dict:
    return load_pt(run / f"iter_{iteration:07d}" / rank / "model_optim_rng.pt")


def test_stop_at_6_and_resume_is_bitwise_identical(setup: dict[str, Path]) -> None:
    full = train(config(setup, "full"))
    first = train(config(setup, "split", exit_interval=6))
    assert first["stopped_by"] == "exit-interval" and read_tracker(setup["root"] / "split") == 6
    resumed = train(config(setup, "split", load=str(setup["root"] / "split")))
    assert resumed["loss_curve"] == full["loss_curve"]  # bitwise: floats compared exactly
    assert resumed["valid_curve"] == full["valid_curve"]
    for rank in ("mp_rank_00_000", "mp_rank_00_001"):
        a, b = rank_file(setup["root"] / "full", 10, rank), rank_file(setup["root"] / "split", 10, rank)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        for name, state in a["optimizer"]["params"].items():
            assert all(torch.equal(state[n], b["optimizer"]["params"][name][n]) for n in state)
        assert a["train_state"]["consumed_train_samples"] == 80


def _die_while_saving(cfg: TrainConfig, plan: object) -> None:
    """A rank that is killed (os._exit, no cleanup) half-way through writing the iteration-8 checkpoint."""
    import bridge.training.legacy_save as legacy

    real_writer = legacy.IncrementalTorchWriter

    def dying_writer(path: Path) -> object:
        if "iter_0000008" in str(path):
            Path(path).write_bytes(b"PK\x03\x04 half a zip file")
            os._exit(9)
        return real_writer(path)

    legacy.IncrementalTorchWriter = dying_writer  # type: ignore[assignment]
    from bridge.training.loop import train_rank

    train_rank(cfg, plan)


def test_killed_during_checkpoint_write_leaves_previous_loadable(setup: dict[str, Path]) -> None:
    from bridge.training.plan import make_plan

    cfg = config(setup, "killed", nproc=None, pp=1, save_interval=4)
    plan = make_plan(TrainConfig(**{**cfg.__dict__, "nproc": 1}))
    with pytest.raises(RuntimeError, match="rank 0 of 1 failed"):
        launch(_die_while_saving, 1, cfg, plan)
    run = setup["root"] / "killed"
    assert (run / TRACKER).read_text() == "4" and (run / "iter_0000008.tmp").is_dir()
    out = export_hf(run, setup["root"] / "killed-hf")  # the previous checkpoint exports
    assert (out / "model.safetensors").is_file()
    resumed = train(config(setup, "killed", load=str(run), nproc=1, pp=1, train_iters=8))
    assert resumed["iterations"] == 8 and not (run / "iter_0000008.tmp").exists()
    assert read_tracker(run) == 8


def test_sigterm_saves_and_exits(setup: dict[str, Path], tmp_path: Path) -> None:
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "bridge.cli", "train", "--load", str(setup["ckpt"]), "--data", str(setup["data"]),
           "--nproc", "1", "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32",
           "--train-iters", "100000", "--eval-interval", "0", "--save", str(save), "--no-progress", "--device", "cpu",
           "--tensorboard-dir", str(tmp_path / "tb")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = save / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped_by"] == "SIGTERM" and 3 <= summary["iterations"] < 100000
    assert read_tracker(save) == summary["iterations"]
    assert json.loads((save / "train_summary.json").read_text())["iterations"] == summary["iterations"]
    from bridge.training.metrics import read_events

    (events,) = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    losses = [v for step, tag, v in read_events(events) if tag == "loss"]
    assert len(losses) == summary["iterations"] and all(np.isfinite(losses))


def test_jsonl_training_exports_loads_and_verifies(tmp_path: Path) -> None:
    """The demo path: a tokenizer-backed tiny Llama at TP=2 PP=2, trained on text; loss falls; export verifies."""
    from transformers import AutoModelForCausalLM

    from bridge.apps.demo import DEMO_LAYOUT, build_model
    from bridge.apps.demo_corpus import CORPUS
    from bridge.training.demo import demo_train
    from bridge.apps.verify import verify

    hf = build_model(tmp_path / "hf")
    ckpt = import_hf(hf, tmp_path / "ckpt", DEMO_LAYOUT)
    losses, save = demo_train(ckpt, CORPUS, tmp_path / "work", iters=12)
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
    summary = json.loads((save / "train_summary.json").read_text())
    assert summary["iterations"] == 12 and summary["final_valid_loss"] is not None
    assert set(summary) >= {"iterations", "tokens", "final_train_loss", "final_valid_loss", "loss_curve"}
    out = export_hf(save, tmp_path / "trained-hf")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert verify(out, save, write_json=False).passed


@pytest.mark.parametrize("extra", [{}, dict(bf16=True, use_precision_aware_optimizer=True)],
                         ids=["fp32", "bf16-master-remainders"])
def test_distributed_optimizer_resume_in_the_legacy_format_is_bitwise_identical(setup: dict[str, Path],
                                                                                extra: dict) -> None:
    """DP=2 with the distributed optimizer, Megatron's legacy layout (`distrib_optim.pt` beside the model file):
    the optimizer state each DP rank owns must come back, or the losses after the resume move. Also with the fp32
    masters kept as remainders beside bf16 weights: saved whole, split again on resume."""
    dist_opt = dict(pp=1, use_distributed_optimizer=True, train_iters=6, eval_interval=0, **extra)
    tag = "-".join(extra) or "fp32"
    full = train(config(setup, f"dist-opt-full-{tag}", **dist_opt))
    first = train(config(setup, f"dist-opt-split-{tag}", exit_interval=3, **dist_opt))
    split = setup["root"] / f"dist-opt-split-{tag}"
    assert first["stopped_by"] == "exit-interval" and read_tracker(split) == 3
    assert (split / "iter_0000003" / "mp_rank_00" / "distrib_optim.pt").is_file()
    resumed = train(config(setup, f"dist-opt-split-{tag}", load=str(split), **dist_opt))
    assert resumed["loss_curve"] == full["loss_curve"]  # bitwise
    a, b = (load_pt(setup["root"] / run / "iter_0000006" / "mp_rank_00" / "model_optim_rng.pt")
            for run in (f"dist-opt-full-{tag}", f"dist-opt-split-{tag}"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
