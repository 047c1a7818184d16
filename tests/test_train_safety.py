"""Training runs that lose or corrupt nothing: pruning after a rollback, out-of-vocabulary data, a full disk while
saving, a diverged loss in the JSON outputs, non-UTF-8 text, and ranks that die with their launcher."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bridge.cli.main import main
from bridge.converters.megatron_legacy import TRACKER, read_tracker
from bridge.data.indexed import IndexedDataset, IndexedDatasetWriter
from bridge.errors import mount_point
from bridge.training import TrainConfig, train
from bridge.training.checkpointing import iterations, prune
from tests.model_fixtures import write_random_corpus
from tests.test_data_prepare import build_tokenizer


@pytest.fixture(scope="module")
def ckpt(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bridge.api import import_hf

    return import_hf(tiny_hf("llama32-tied"), tmp_path_factory.mktemp("safety") / "ckpt")  # vocabulary: 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_corpus(tmp_path_factory.mktemp("corpus") / "c", seed=3, documents=40)


def run_config(ckpt: Path, corpus: Path, save: Path, **kw: object) -> TrainConfig:
    base = dict(load=str(ckpt), data_path=[str(corpus)], micro_batch_size=2, seq_length=32, lr=1e-3, eval_interval=0,
                eval_iters=1, progress=False, save=str(save), device="cpu")
    return TrainConfig(**{**base, **kw})


def cli_train(ckpt: Path, *flags: str) -> list[str]:
    return ["train", "--load", str(ckpt), "--micro-batch-size", "2", "--seq-length", "32", "--eval-interval", "0",
            "--eval-iters", "1", "--no-progress", "--device", "cpu", *flags]


def test_keep_last_after_a_rollback_or_a_restart_keeps_what_this_run_saved(ckpt: Path, corpus: Path,
                                                                         tmp_path: Path) -> None:
    """A run rolled back to iteration 2 of a --save that holds 2, 4, 6 saves 3: the tracked 3 stays, 4 and 6 (the
    abandoned line) are left alone, 2 goes (K=1). A run started over into that folder likewise keeps its own save,
    and training resumes from the tracked checkpoint afterwards."""
    save = tmp_path / "run"
    train(run_config(ckpt, corpus, save, train_iters=6, save_interval=2))
    (save / TRACKER).write_text("2")  # roll back, as Megatron-LM users do
    rolled = train(run_config(ckpt, corpus, save, load=str(save), train_iters=3, keep_last_checkpoints=1))
    assert rolled["iterations"] == 3 and read_tracker(save) == 3
    assert iterations(save) == [3, 4, 6]
    train(run_config(ckpt, corpus, save, train_iters=1, keep_last_checkpoints=1))  # start over from the import
    assert read_tracker(save) == 1 and iterations(save) == [1, 3, 4, 6]
    resumed = train(run_config(ckpt, corpus, save, load=str(save), train_iters=2, keep_last_checkpoints=1))
    assert resumed["iterations"] == 2 and resumed["loss_curve"][0][0] == 1  # resumed from the tracked iteration 1
    assert read_tracker(save) == 2 and iterations(save) == [2, 3, 4, 6]


def test_prune_keeps_this_runs_saves_before_older_folders(tmp_path: Path) -> None:
    """Saves at 14 and 21 after a resume from 10 of a folder that also holds 20 and 30 of another line: K=2 keeps
    this run's 21 and 14, removes 20 and 10 below the latest save, and never touches 30 above it."""
    for it in (10, 14, 20, 21, 30):
        (tmp_path / f"iter_{it:07d}").mkdir()
    prune(tmp_path, 2, [14, 21])
    assert iterations(tmp_path) == [14, 21, 30]


def test_out_of_vocabulary_token_ids_are_refused_before_training(ckpt: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    prefix = tmp_path / "oov"
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for n in range(20):
            w.add_document(np.array([3, 4, 5000 if n == 17 else 6, 7], np.uint16))
    code = main(cli_train(ckpt, "--data", str(prefix), "--train-iters", "1"))
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"{prefix} holds token ids 3 to 5000, but the model's vocabulary has 300 tokens" in err


def test_token_range_reads_the_data_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bridge.data.indexed as indexed

    corpus = write_random_corpus(tmp_path / "c", seed=5, documents=30)
    with open(f"{corpus}.bin", "ab") as f:
        f.write(np.array([9999], np.uint16).tobytes())  # bytes past the last sequence are not data
    monkeypatch.setattr(indexed, "_SCAN_ITEMS", 7)
    tokens = np.concatenate(list(IndexedDataset(corpus).documents()))
    assert IndexedDataset(corpus).token_range() == (int(tokens.min()), int(tokens.max()))


def test_jsonl_tokenized_past_the_vocabulary_is_refused(ckpt: Path, tmp_path: Path) -> None:
    """A tokenizer that is not the model's (its ids go up to 423) on a model of 300 tokens."""
    tok = build_tokenizer(tmp_path / "tok")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "user assistant system hello world answer question"}) + "\n"
                            for _ in range(20)))
    from bridge.errors import BridgeError

    with pytest.raises(BridgeError, match=r"d\.jsonl tokenizes to token ids up to \d+, but the model's vocabulary "
                                          r"has 300 tokens"):
        train(run_config(ckpt, data, tmp_path / "run", tokenizer=str(tok), train_iters=1))


def test_jsonl_that_is_not_utf8_names_the_line(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"text": "fine"}\n' * 4 + b'{"text": "caf\xe9"}\n')
    code = main(cli_train(ckpt, "--data", str(data), "--tokenizer", str(build_tokenizer(tmp_path / "tok"))))
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"{data}:5: not UTF-8 (byte {4 * 17 + 13}" in err


def test_full_disk_while_saving_is_one_line_and_leaves_no_tmp(ckpt: Path, corpus: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    from bridge.training import legacy_save

    class FullDiskWriter(legacy_save.IncrementalTorchWriter):
        def tensor(self, tensor):  # noqa: ANN001, ANN202
            raise OSError(errno.ENOSPC, "No space left on device")

    save = tmp_path / "run"
    train(run_config(ckpt, corpus, save, train_iters=2))  # a tracked checkpoint to fall back on
    monkeypatch.setattr(legacy_save, "IncrementalTorchWriter", FullDiskWriter)
    code = main(cli_train(ckpt, "--load", str(save), "--data", str(corpus), "--train-iters", "3", "--save", str(save)))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith(f"bridge train: error: no space left on {mount_point(save)} writing "
                                            f"{save}/iter_0000003.tmp; "), err
    assert not any("Traceback" in line for line in err)
    assert not list(save.glob("*.tmp")) and read_tracker(save) == 2


def test_diverged_loss_is_null_in_the_json_outputs(ckpt: Path, corpus: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    from bridge.nn import gpt

    real = gpt.linear_cross_entropy  # the loss the trainer takes (its gradients stay finite)
    monkeypatch.setattr(gpt, "linear_cross_entropy", lambda *args, **kw: real(*args, **kw) + float("nan"))
    save = tmp_path / "run"
    assert main(cli_train(ckpt, "--data", str(corpus), "--train-iters", "2", "--save", str(save))) == 0

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    printed = strict(capsys.readouterr().out.strip().splitlines()[-1])
    summary = strict((save / "train_summary.json").read_text())
    lines = [strict(line) for line in (save / "train_log.jsonl").read_text().splitlines()]
    assert printed["final_train_loss"] is None and printed["loss_finite"] is False
    assert summary["loss_curve"] == [[1, None], [2, None]] and summary["loss_finite"] is False
    assert [line["loss"] for line in lines] == [None, None]


def _start_two_ranks(ckpt: Path, save: Path) -> tuple[subprocess.Popen, list]:
    """`bridge train --nproc 2` in its own session, once both ranks train (a step logged): (launcher, ranks)."""
    import psutil

    cmd = [sys.executable, "-m", "bridge.cli", *cli_train(ckpt, "--mock-data", "--nproc", "2", "--train-iters",
                                                          "100000", "--save", str(save), "--save-interval", "100000")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = save / "train_log.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not log.is_file() or not log.read_text()):
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.2)
    servers = [p for p in psutil.Process(proc.pid).children() if "forkserver" in " ".join(p.cmdline())]
    assert len(servers) == 1  # the ranks are forked from the launcher's fork server
    ranks = servers[0].children()
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
