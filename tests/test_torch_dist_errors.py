"""Bad or partial torch_dist folders: one clear line (what is wrong, what to do), exit 1, nothing half-written."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from bridge import api
from bridge.cli.main import main
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout


@pytest.fixture
def dist(tiny_hf, tmp_path: Path) -> Path:
    return api.import_hf(tiny_hf("qwen3"), tmp_path / "dist", ParallelLayout(), format="torch_dist")


def export_error(capsys: pytest.CaptureFixture, ckpt: Path, tmp_path: Path) -> str:
    out = tmp_path / "out"
    assert main(["export", str(ckpt), "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bridge ")]
    assert len(err) == 1 and "error:" in err[0], err
    assert not out.exists() and not (tmp_path / "out.tmp").exists()
    return err[0]


def test_missing_metadata_json_means_interrupted_save(dist: Path, tmp_path: Path, capsys) -> None:
    (dist / "release" / "metadata.json").unlink()  # Megatron (and bridge) write it last
    assert "has no metadata.json; the torch_dist checkpoint is incomplete" in export_error(capsys, dist, tmp_path)


def test_missing_dcp_metadata(dist: Path, tmp_path: Path, capsys) -> None:
    (dist / "release" / ".metadata").unlink()
    assert "has no .metadata; the torch_dist checkpoint is incomplete" in export_error(capsys, dist, tmp_path)


def test_missing_data_file(dist: Path, tmp_path: Path, capsys) -> None:
    (dist / "release" / "__0_0.distcp").unlink()
    assert "__0_0.distcp is missing" in export_error(capsys, dist, tmp_path)


def test_truncated_data_file(dist: Path, tmp_path: Path, capsys) -> None:
    path = dist / "release" / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "__0_0.distcp is truncated" in export_error(capsys, dist, tmp_path)


def test_corrupt_chunk(dist: Path, tmp_path: Path, capsys) -> None:
    path = dist / "release" / "__0_0.distcp"
    data = bytearray(path.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)
    path.write_bytes(bytes(data))
    assert "the file is truncated or corrupt" in export_error(capsys, dist, tmp_path)


def test_corrupt_metadata(dist: Path, tmp_path: Path, capsys) -> None:
    (dist / "release" / ".metadata").write_bytes(b"not a pickle")
    assert "cannot read" in export_error(capsys, dist, tmp_path)


def test_metadata_refuses_arbitrary_globals(dist: Path, tmp_path: Path, capsys) -> None:
    (dist / "release" / ".metadata").write_bytes(pickle.dumps(shutil.rmtree))
    assert "refusing to load shutil" in export_error(capsys, dist, tmp_path)


def test_missing_tensor_is_listed(dist: Path, tmp_path: Path, capsys) -> None:
    path = dist / "release" / ".metadata"
    md = pickle.loads(path.read_bytes())
    del md.state_dict_metadata["decoder.layers.self_attention.k_layernorm.weight"]
    path.write_bytes(pickle.dumps(md))
    err = export_error(capsys, dist, tmp_path)
    assert "missing 1: decoder.layers.self_attention.k_layernorm.weight" in err


def test_other_backend_is_named(dist: Path, tmp_path: Path, capsys) -> None:
    (dist / "release" / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1}))
    assert "'zarr' distributed checkpoint" in export_error(capsys, dist, tmp_path)


def test_unknown_format_flag(tiny_hf, tmp_path: Path) -> None:
    with pytest.raises(BridgeError, match="--format safetensors is not one of torch, torch_dist"):
        api.import_hf(tiny_hf("qwen3"), tmp_path / "x", format="safetensors")
