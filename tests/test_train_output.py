"""What `bridge train` shows and records: the per-interval lines, the timing of each step, the run summary."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bridge.cli.main import main


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bridge.api import import_hf

    return import_hf(tiny_hf("llama32-tied"), tmp_path_factory.mktemp("out") / "ckpt")


def _train(ckpt: Path, *flags: str) -> int:
    return main(["train", "--load", str(ckpt), "--mock-data", "--seq-length", "32", "--global-batch-size", "2",
                 "--eval-iters", "1", "--device", "cpu", *flags])


def test_no_progress_prints_one_line_per_log_interval(tiny_ckpt: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert _train(tiny_ckpt, "--train-iters", "4", "--log-interval", "2", "--eval-interval", "0", "--no-progress",
                  "--save", str(tmp_path / "run")) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.lstrip().startswith("iteration")]
    assert len(lines) == 2 and "2/       4" in lines[0] and "4/       4" in lines[1]
    for name in ("lm loss:", "learning rate:", "grad norm:", "tokens/s:", "TFLOP/s/GPU:", "peak memory (GiB):"):
        assert name in lines[0]


def test_every_steps_time_is_its_own_the_last_one_too(tiny_ckpt: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued ahead, step n's results are read after step n+1 ran: that must not move time between the steps."""
    from bridge.training import loop

    step = loop.train_step

    def slow_step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(0.2)
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", slow_step)
    assert _train(tiny_ckpt, "--train-iters", "4", "--eval-interval", "0", "--no-progress",
                  "--save", str(tmp_path / "run")) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["step_s"] >= 0.2, records  # at least its own sleep: the last step measured nothing
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_s"])


def test_summary_file_has_the_final_validation_loss(tiny_ckpt: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """The last step is a save point: the summary written with it holds the final validation loss."""
    run = tmp_path / "run"
    assert _train(tiny_ckpt, "--train-iters", "2", "--save-interval", "2", "--no-progress", "--save", str(run)) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((run / "train_summary.json").read_text())
    assert printed["final_valid_loss"] is not None
    assert saved["final_valid_loss"] == printed["final_valid_loss"]


def test_card_leaves_out_a_verification_of_another_iteration(tiny_hf, tiny_ckpt: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """verify.json says which iteration it compared; after a resume the card does not claim it for the new one."""
    from bridge.apps.model_card import build_model_card

    run = tmp_path / "run"
    assert _train(tiny_ckpt, "--train-iters", "2", "--eval-interval", "0", "--no-progress",
                  "--save", str(run)) == 0
    hf = tiny_hf("llama32-tied")
    assert main(["verify", str(hf), str(run), "--prompts", str(_prompts(tmp_path))]) in (0, 1)
    assert json.loads((run / "verify.json").read_text())["iteration"] == 2
    assert "## Verification" in build_model_card(hf, "me/x", checkpoint=run).text
    assert main(["train", "--load", str(run), "--mock-data", "--seq-length", "32", "--global-batch-size", "2",
                 "--device", "cpu", "--train-iters", "3", "--eval-interval", "0", "--eval-iters", "1",
                 "--no-progress", "--save", str(run)]) == 0
    capsys.readouterr()
    assert "## Verification" not in build_model_card(hf, "me/x", checkpoint=run).text


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("hello world\n")
    return path


def test_automatic_reshard_of_load_is_removed_and_load_recorded(tiny_hf, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    from bridge.api import import_hf
    from bridge.layout import ParallelLayout

    tp2 = import_hf(tiny_hf("llama32-tied"), tmp_path / "tp2", ParallelLayout(tp=2))
    run = tmp_path / "run"
    assert _train(tp2, "--train-iters", "1", "--eval-interval", "0", "--no-progress", "--save", str(run)) == 0
    assert not list(run.glob(".load-*"))  # a full copy of the model, resharded to tp1 for this run
    assert json.loads((run / "bridge.json").read_text())["source"]["trained_from"] == str(tp2)


def test_training_without_save_says_so(tiny_ckpt: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.WARNING):
        assert _train(tiny_ckpt, "--train-iters", "1", "--eval-interval", "0", "--no-progress") == 0
    assert [r.getMessage() for r in caplog.records if "no --save" in r.getMessage()] == [
        "no --save: this run keeps nothing of what it trains; pass --save DIR for checkpoints"]


def test_under_torchrun_only_rank_0_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bridge` configured logging before the rank started: ranks other than 0 keep to warnings ("saved checkpoint"
    and the other progress messages once, not once per rank)."""
    import logging

    from bridge.training import loop, run

    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.INFO)
    monkeypatch.setattr(run.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(loop, "train_rank", lambda cfg, plan: None)
    run._rank_main(None, None)  # type: ignore[arg-type]
    assert root.level == logging.WARNING
