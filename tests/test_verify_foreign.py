"""Legacy Megatron-LM folders (no bridge.json) in `bridge verify --hf-config`, and a vocabulary padded otherwise than
bridge pads it (`args.padded_vocab_size` is what the rank files hold, whatever `make_vocab_size_divisible_by` says).

The folders are bridge imports with bridge.json and hf_meta/ removed, which is what Megatron-LM's own legacy save
leaves (tests/interop checks Megatron Core loads bridge's rank files); torch_dist folders written by Megatron Core
itself are verified in tests/interop/test_megatron_current_checkpoints.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bridge.cli.main import main
from bridge.converters.megatron_legacy import FILE_NAME
from tests.model_fixtures import load_pt
from tests.test_convert_roundtrip import assert_identical
from tests.test_foreign_checkpoint import strip_bridge_files


def _megatron_lm_folder(hf: Path, out: Path, *extra: str) -> Path:
    assert main(["import", str(hf), "--out", str(out), "--tp", "2", "--transformer-impl", "local", *extra]) == 0
    strip_bridge_files(out)
    return out


def test_verify_megatron_lm_folder_with_hf_config(tiny_hf, tmp_path: Path, capsys) -> None:
    hf = tiny_hf("qwen3")
    ckpt = _megatron_lm_folder(hf, tmp_path / "megatron")
    capsys.readouterr()
    assert main(["verify", str(hf), str(ckpt), "--no-json"]) == 1
    err = capsys.readouterr().err.strip()
    assert "pass --hf-config" in err and "\n" not in err
    assert main(["verify", str(hf), str(ckpt), "--hf-config", str(hf)]) == 0, capsys.readouterr()
    assert "layout tp=2 pp=1 (local)" in capsys.readouterr().out
    assert (ckpt / "verify.json").is_file()


def test_rank_files_padded_otherwise_export_exactly_and_verify_refuses_in_one_line(tiny_hf, tmp_path: Path,
                                                                                    capsys) -> None:
    hf = tiny_hf("qwen3")  # 300 tokens: 304 rows when padded to 8 x TP; the args then claim 128, which pads to 512
    ckpt = _megatron_lm_folder(hf, tmp_path / "megatron", "--make-vocab-size-divisible-by", "8")
    for path in sorted((ckpt / "release").glob(f"mp_rank_*/{FILE_NAME}")):
        state = load_pt(path)
        assert state["args"].padded_vocab_size == 304
        state["args"].make_vocab_size_divisible_by = 128
        torch.save(state, path)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf"), "--hf-config", str(hf)]) == 0
    assert_identical(hf, tmp_path / "hf")
    capsys.readouterr()
    assert main(["verify", str(hf), str(ckpt), "--hf-config", str(hf), "--no-json"]) == 1
    err = capsys.readouterr().err.strip()
    assert "holds 304 vocabulary rows, not the 512" in err and "\n" not in err and "Traceback" not in err
