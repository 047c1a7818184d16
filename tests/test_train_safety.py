"""Training runs that lose or corrupt nothing: ranks that die with their launcher."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ckpt(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bridge.api import import_hf

    return import_hf(tiny_hf("llama32-tied"), tmp_path_factory.mktemp("safety") / "ckpt")  # vocabulary: 300


def cli_train(ckpt: Path, *flags: str) -> list[str]:
    return ["train", "--load", str(ckpt), "--micro-batch-size", "2", "--seq-length", "32", "--eval-interval", "0",
            "--eval-iters", "1", "--no-progress", "--device", "cpu", *flags]


def _start_two_ranks(ckpt: Path, save: Path) -> tuple[subprocess.Popen, list]:
    """`bridge train --nproc 2` in its own session, once both ranks train (two steps logged): (launcher, ranks)."""
    import psutil

    cmd = [sys.executable, "-m", "bridge.cli", *cli_train(ckpt, "--mock-data", "--nproc", "2", "--train-iters",
                                                          "100000", "--save", str(save), "--save-interval", "100000")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = save / "train_log.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 2):
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.2)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    return proc, ranks


@pytest.mark.slow
def test_ranks_die_with_a_killed_launcher(ckpt: Path, tmp_path: Path) -> None:
    import psutil

    proc, ranks = _start_two_ranks(ckpt, tmp_path / "run")
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(ranks, timeout=10)
    for rank in alive:  # do not leave them training if the check fails
        rank.kill()
    assert not alive


@pytest.mark.slow
def test_ctrl_c_stops_the_ranks_quietly_with_one_line(ckpt: Path, tmp_path: Path) -> None:
    import psutil

    proc, ranks = _start_two_ranks(ckpt, tmp_path / "run")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, err = proc.communicate(timeout=60)
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive and proc.returncode == 130
    assert "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("bridge train:")] == \
        ["bridge train: interrupted; no partial output was left"]
