"""Megatron-LM checkpoints without bridge.json: export/reshard/inspect with --hf-config, from their args."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bridge.cli.main import main
from tests.test_convert_roundtrip import assert_identical


def strip_bridge_files(ckpt: Path) -> None:
    """What Megatron-LM itself leaves: the tree and its args, no bridge.json, no hf_meta/."""
    (ckpt / "bridge.json").unlink()
    shutil.rmtree(ckpt / "hf_meta")


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_export_megatron_lm_folder_with_hf_config(tiny_hf, tmp_path: Path, fmt: str, capsys) -> None:
    src = tiny_hf("qwen3")
    ckpt = tmp_path / "megatron"
    assert main(["import", str(src), "--out", str(ckpt), "--tp", "2", "--pp", "2", "--format", fmt]) == 0
    strip_bridge_files(ckpt)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "no-config")]) == 1
    assert "pass --hf-config" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf"), "--hf-config", str(src)]) == 0
    assert_identical(src, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    assert main(["reshard", str(ckpt), "--out", str(tmp_path / "tp1"), "--tp", "1", "--hf-config", str(src)]) == 0
    assert main(["inspect", str(ckpt), "--hf-config", str(src)]) == 0
    assert "Qwen3ForCausalLM" in capsys.readouterr().out


def test_wrong_hf_config_is_refused(tiny_hf, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "megatron"
    assert main(["import", str(tiny_hf("qwen3")), "--out", str(ckpt), "--tp", "2"]) == 0
    strip_bridge_files(ckpt)
    other = tiny_hf("qwen3", num_hidden_layers=8)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf"), "--hf-config", str(other)]) == 1
    err = capsys.readouterr().err
    assert "num_layers: checkpoint 4 vs HF 8" in err and not (tmp_path / "hf").exists()
