"""One-line errors for a user's mistakes: what is wrong, in the user's terms, and what to do."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.cli.main import main


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bridge.api import import_hf

    return import_hf(tiny_hf("llama32-tied"), tmp_path_factory.mktemp("errors") / "ckpt")


def _one_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_device_cuda_without_a_gpu(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(["train", "--load", str(tiny_ckpt), "--mock-data", "--seq-length", "32", "--device", "cuda"]) == 1
    err = _one_line(capsys)
    assert "no CUDA GPU is visible" in err and "--device cpu" in err and "None" not in err


def test_export_of_a_missing_iteration_lists_those_there(tiny_ckpt: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(tiny_ckpt), "--out", str(tmp_path / "hf"), "--iteration", "4"]) == 1
    err = _one_line(capsys)
    assert "has no iteration 4; it holds iteration release" in err and "incomplete" not in err


def test_tokenizer_error_is_whole_and_names_what_the_user_gave(tiny_hf, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    """--load resharded for the run: the error names --load, not the reshard's folder, and says to pass --tokenizer."""
    from bridge.api import import_hf
    from bridge.data import tokenizer
    from bridge.layout import ParallelLayout

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ValueError("Couldn't instantiate the backend tokenizer from one of: \n(1) a `tokenizers` library "
                         "serialization file, \n(2) a slow tokenizer instance to convert or \n(3) an equivalent slow "
                         "tokenizer class to instantiate and convert. \nYou need to have sentencepiece installed.")

    tp2 = import_hf(tiny_hf("llama32-tied"), tmp_path / "tp2", ParallelLayout(tp=2))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    monkeypatch.setattr(tokenizer, "load_pretrained", broken)
    assert main(["train", "--load", str(tp2), "--data", str(data), "--seq-length", "16", "--train-iters", "1",
                 "--device", "cpu", "--no-progress", "--save", str(tmp_path / "run")]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("bridge train: error: ")  # after the reshard's progress bar
    err = lines[0]
    assert f"the tokenizer of {tp2 / 'hf_meta'}:" in err and ".load-" not in err
    assert "You need to have sentencepiece installed; pass --tokenizer" in err and "pass --tokenizer" in err


def test_train_help_explains_every_flag_and_shows_defaults() -> None:
    import argparse

    from bridge.cli.main import build_parser

    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    bare = [a.option_strings[0] for a in train._actions if a.option_strings and not a.help]
    assert bare == []
    text = " ".join(train.format_help().split())
    for shown in ("(Megatron-LM: required) (default: 2048)", "(default: 100)", "(default: 0.0003)",
                  "(default: linear)", "(Megatron-LM: 100) (default: 1)"):
        assert shown in text


def test_inspect_shows_the_whole_layout_and_no_none(tiny_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    from bridge.cli.convert import layout_text
    from bridge.layout import ParallelLayout

    assert main(["inspect", str(tiny_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "layout        tp=1 pp=1 (" in out and "None" not in out
    moe = layout_text(ParallelLayout(tp=2, pp=2, vpp=2, ep=4, moe_grouped_gemm=True).to_json())
    assert moe == "tp=2 pp=2 vpp=2 ep=4 grouped-gemm (TEGroupedMLP)"


def test_long_rope_under_context_parallelism_is_refused(tiny_hf, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """LongRoPE picks its table from the whole sequence's longest position, which no CP rank sees."""
    from bridge.api import import_hf

    ckpt = import_hf(tiny_hf("phi3"), tmp_path / "phi3")
    capsys.readouterr()  # making the model and the checkpoint: not the error under test
    assert main(["train", "--load", str(ckpt), "--mock-data", "--seq-length", "32", "--cp", "2", "--nproc", "2"]) == 1
    err = _one_line(capsys)
    assert "LongRoPE does not run under context parallelism" in err and "--cp 1" in err


def test_attention_softcaps_under_context_parallelism_are_refused(tiny_hf, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """Gemma 2 soft-caps its attention scores, which the CP exchanges' kernels do not: training and verify refuse it
    before a process starts."""
    from bridge.api import import_hf

    ckpt = import_hf(tiny_hf("gemma2"), tmp_path / "gemma2")
    capsys.readouterr()
    assert main(["train", "--load", str(ckpt), "--mock-data", "--seq-length", "32", "--cp", "2", "--nproc", "2"]) == 1
    err = _one_line(capsys)
    assert "soft-caps its attention scores" in err and "--cp 1" in err
    assert main(["verify", str(tiny_hf("gemma2")), str(ckpt), "--cp", "2"]) == 1
    assert "soft-caps its attention scores" in _one_line(capsys)
