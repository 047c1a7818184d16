"""Bad or partial torch_dist folders: one clear line (what is wrong, what to do), exit 1, nothing half-written."""
from __future__ import annotations

import json
import pickle
import shlex
import shutil
import struct
from pathlib import Path, PosixPath
from typing import Any, Callable

import pytest
import torch
import torch.distributed.checkpoint.metadata

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


def rewrite_metadata(ckpt: Path, edit: Callable[[Any], None]) -> None:
    path = ckpt / "release" / ".metadata"
    md = pickle.loads(path.read_bytes())  # written by bridge import a moment ago
    edit(md)
    path.write_bytes(pickle.dumps(md))


def plant_call(ckpt: Path, module: str, name: str, arg: str) -> None:
    """Rewrite `.metadata` so that unpickling it calls `module.name(arg)` while loading an otherwise valid Metadata.

    The call's result lands in `storage_meta.save_id`, a field no reader looks at, so a reader that runs it
    goes on as if nothing happened. Protocol 2 opcodes (no frames to patch) under a protocol 4 header:
    protocol 4 is what makes pickle resolve a dotted name attribute by attribute.
    """
    slot = "bridge-test-slot"
    path = ckpt / "release" / ".metadata"
    md = pickle.loads(path.read_bytes())
    md.storage_meta.save_id = slot
    data = pickle.dumps(md, protocol=2)
    text = b"X" + struct.pack("<I", len(slot)) + slot.encode()
    call = f"c{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(arg.encode())) + arg.encode() + b"\x85R"
    assert data.startswith(b"\x80\x02") and data.count(text) == 1
    path.write_bytes(b"\x80\x04" + data[2:].replace(text, call))


def run_cli(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, list[str]]:
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_error_line(argv: list[str], code: int, err: list[str]) -> str:
    assert code == 1 and len(err) == 1 and err[0].startswith(f"bridge {argv[0]}: error: "), (code, err)
    return err[0]


def one_error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    return assert_one_error_line(argv, *run_cli(capsys, argv))


CALLS = {  # globals the torch.distributed.checkpoint package reaches by attribute: one through `os`, one through `torch`
    "os.system": lambda marker: ("torch.distributed.checkpoint.filesystem", "os.system", f"touch {shlex.quote(str(marker))}"),
    "torch.os.mkdir": lambda marker: ("torch.distributed.checkpoint.metadata", "torch.os.mkdir", str(marker)),
}


@pytest.mark.parametrize("route", sorted(CALLS))
def test_metadata_cannot_run_code(dist: Path, tmp_path: Path, capsys, route: str) -> None:
    marker = tmp_path / "ran"
    plant_call(dist, *CALLS[route](marker))
    for argv in (["export", str(dist), "--out", str(tmp_path / "out")], ["inspect", str(dist)]):
        code, lines = run_cli(capsys, argv)
        assert not marker.exists(), f"bridge {argv[0]} ran code from .metadata (exit {code})"
        err = assert_one_error_line(argv, code, lines)
        assert "refusing to load torch.distributed.checkpoint." in err, err
    assert not (tmp_path / "out").exists()


def test_metadata_dotted_names_are_refused(dist: Path, tmp_path: Path, capsys) -> None:
    """Even a dotted path that ends at an allowed class: names are matched whole, never walked."""
    plant_call(dist, "torch.distributed.checkpoint.metadata", "torch.Size", "")
    assert "refusing to load torch.distributed.checkpoint.metadata.torch.Size" in export_error(capsys, dist, tmp_path)


def _text(value: str) -> bytes:
    return b"X" + struct.pack("<I", len(value.encode())) + value.encode()


def plant_ops(ckpt: Path, ops: bytes) -> None:
    """Run hand-written protocol 2 opcodes `ops` (which leave one object on the stack, popped) before the valid
    Metadata that `.metadata` holds loads as usual."""
    path = ckpt / "release" / ".metadata"
    data = pickle.dumps(pickle.loads(path.read_bytes()), protocol=2)
    path.write_bytes(data[:2] + ops + b"0" + data[2:])


SETATTRS = {  # pickle's BUILD sets attributes on whatever a global names, a class or a function alike
    "a DCP class": (b"ctorch.distributed.checkpoint.metadata\nMetadataIndex\nN}" + _text("bridge_test")
                    + _text("x") + b"s\x86b",
                    lambda: "bridge_test" not in vars(torch.distributed.checkpoint.metadata.MetadataIndex)),
    "torch's layout cache": (b"ctorch.serialization\n_get_layout\n}" + _text("cache") + b"}" + _text("torch.strided")
                             + b"ctorch\nsparse_coo\nssb",
                             lambda: torch.serialization._get_layout("torch.strided") is torch.strided),
    "pathlib's __fspath__": (b"cpathlib\nPosixPath\nN}" + _text("__fspath__") + b"ctorch.serialization\n_get_layout\n"
                             + b"s\x86b", lambda: "__fspath__" not in vars(PosixPath)),
}


@pytest.mark.parametrize("target", sorted(SETATTRS))
def test_metadata_cannot_change_shared_objects(dist: Path, tmp_path: Path, capsys, target: str) -> None:
    """A class or function that outlived the load changed (a poisoned layout cache and pathlib's `__fspath__`
    together redirect every later open() of a given path) would change the rest of the process."""
    ops, unchanged = SETATTRS[target]
    plant_ops(dist, ops)
    try:
        code, lines = run_cli(capsys, ["export", str(dist), "--out", str(tmp_path / "out")])
        assert unchanged(), f"{target} changed by loading .metadata (exit {code})"
        assert_one_error_line(["export"], code, lines)
    finally:
        for name in ("bridge_test", "__fspath__"):
            for cls in (torch.distributed.checkpoint.metadata.MetadataIndex, PosixPath):
                if name in vars(cls):
                    delattr(cls, name)
        torch.serialization._get_layout.cache.clear()


def test_data_file_outside_the_folder_is_refused(dist: Path, tmp_path: Path, capsys) -> None:
    outside = dist / "other" / "__0_0.distcp"  # a real, valid data file, one folder up from release/
    outside.parent.mkdir()
    shutil.move(dist / "release" / "__0_0.distcp", outside)
    for where in ("../other/__0_0.distcp", str(outside)):
        rewrite_metadata(dist, lambda md: [setattr(info, "relative_path", where) for info in md.storage_data.values()])
        err = one_error_line(capsys, ["export", str(dist), "--out", str(tmp_path / "out")])
        assert f"stored at '{where}', not a file inside the checkpoint folder" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value", [("offset", -1), ("length", -1), ("offset", 1.5), ("length", "64")])
def test_bad_storage_offsets_are_refused(dist: Path, tmp_path: Path, capsys, field: str, value: Any) -> None:
    rewrite_metadata(dist, lambda md: setattr(next(iter(md.storage_data.values())), field, value))
    err = export_error(capsys, dist, tmp_path)
    assert f"{field} {value!r}" in err and "not a non-negative integer" in err, err


def test_missing_tensor_is_listed(dist: Path, tmp_path: Path, capsys) -> None:
    rewrite_metadata(dist, lambda md: md.state_dict_metadata.pop("decoder.layers.self_attention.k_layernorm.weight"))
    err = export_error(capsys, dist, tmp_path)
    assert "missing 1: decoder.layers.self_attention.k_layernorm.weight" in err


def test_other_backend_is_named(dist: Path, tmp_path: Path, capsys) -> None:
    (dist / "release" / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1}))
    assert "'zarr' distributed checkpoint" in export_error(capsys, dist, tmp_path)


def test_unknown_format_flag(tiny_hf, tmp_path: Path) -> None:
    with pytest.raises(BridgeError, match="--format safetensors is not one of torch, torch_dist"):
        api.import_hf(tiny_hf("qwen3"), tmp_path / "x", format="safetensors")
