"""`bridge train --load` reads a torch_dist checkpoint like a legacy one: same losses."""
from __future__ import annotations

import json
from pathlib import Path

from bridge import ParallelLayout, api
from bridge.cli.main import main


def train_losses(load: Path, save: Path) -> list[float]:
    argv = ["train", "--load", str(load), "--mock-data", "--nproc", "2", "--tp", "2", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--seq-length", "32", "--train-iters", "3", "--save", str(save), "--no-progress",
            "--eval-iters", "1"]  # the final validation (not compared here): one batch, not 100
    assert main(argv) == 0
    summary = json.loads((save / "train_summary.json").read_text())
    return [loss for _, loss in summary["loss_curve"]]


def test_train_from_torch_dist_equals_train_from_torch(tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf("llama32-tied")
    legacy = api.import_hf(src, tmp_path / "legacy", ParallelLayout(tp=2))
    dist = api.import_hf(src, tmp_path / "dist", ParallelLayout(tp=2), format="torch_dist")
    a = train_losses(legacy, tmp_path / "run-legacy")
    b = train_losses(dist, tmp_path / "run-dist")
    assert len(a) == 3 and a == b
