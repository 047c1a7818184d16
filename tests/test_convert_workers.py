"""`--workers N`: import (and reshard) to torch_dist and export in N processes give what one process gives, tensor for tensor, and a
failing process leaves no output."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from bridge import api
from bridge.converters import convert
from bridge.converters.dcp import DcpReader
from bridge.converters.workers import balanced_groups
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from tests.test_convert_roundtrip import assert_identical, read_all


def dcp_entries(ckpt: Path) -> dict[str, Any]:
    """Every tensor (whole) and byte entry of a torch_dist checkpoint's release folder."""
    reader = DcpReader(ckpt / "release")
    entries: dict[str, Any] = {}
    for key, entry in reader.metadata.state_dict_metadata.items():
        if hasattr(entry, "size"):
            entries[key] = reader.read(key, [0] * len(entry.size), list(entry.size))
        else:
            entries[key] = reader.read_bytes(key)
    return entries


def assert_same_entries(a: Path, b: Path) -> None:
    left, right = dcp_entries(a), dcp_entries(b)
    assert sorted(left) == sorted(right)
    for key, value in left.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == right[key].dtype and torch.equal(value, right[key]), key
        elif key != "common_state/shard_0_1":  # holds torch.save's pickle, equal in content
            assert value == right[key], key


def test_balanced_groups_keep_keys_together() -> None:
    keys = [{"a"}, {"a"}, {"b"}, {"c"}, {"c"}, {"d"}]
    assert balanced_groups([1, 1, 2, 1, 1, 2], keys, 2) == [range(0, 3), range(3, 6)]
    assert balanced_groups([1] * 4, [{"x"}] * 4, 3) == [range(0, 4)]  # one key: one group, whatever N
    assert balanced_groups([5, 1, 1, 1], [{"p"}, {"q"}, {"r"}, {"s"}], 2) == [range(0, 1), range(1, 4)]


def test_import_torch_dist_and_export_in_two_processes(tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf("qwen3", dtype=torch.bfloat16)
    one = api.import_hf(src, tmp_path / "one", format="torch_dist")
    two = api.import_hf(src, tmp_path / "two", format="torch_dist", workers=2)
    assert sorted(p.name for p in (two / "release").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (one / "release").iterdir()) == sorted(
        p.name for p in (two / "release").iterdir() if p.name != "__1_0.distcp")
    assert (one / "bridge.json").read_text() == (two / "bridge.json").read_text()
    assert_same_entries(one, two)
    assert_same_entries(one, api.reshard(one, tmp_path / "resharded", ParallelLayout(), workers=2))
    assert_identical(src, api.export_hf(two, tmp_path / "hf", workers=2, max_shard_size="200KB"))


def test_moe_export_in_two_processes_is_bit_exact(tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf("mixtral")
    ckpt = api.import_hf(src, tmp_path / "ep2", ParallelLayout(ep=2))
    out = api.export_hf(ckpt, tmp_path / "hf", workers=2)
    assert len(list(out.glob("*.safetensors"))) == 2 and (out / "model.safetensors.index.json").is_file()
    assert_identical(src, out)


def _failing_share(*call: Any) -> Any:
    """Part 1 fails at once; part 0 converts its share, then would run on long after (it must be stopped)."""
    if call[5] == 1:
        raise BridgeError("share 1 could not be converted")
    result = convert._torch_dist_share(*call)
    time.sleep(120)
    return result


def test_a_failing_process_stops_the_others_and_leaves_no_output(tiny_hf, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = convert.run_in_processes
    monkeypatch.setattr(convert, "run_in_processes", lambda task, calls: real(_failing_share, calls))
    started = time.monotonic()
    with pytest.raises(BridgeError, match="^share 1 could not be converted$"):
        api.import_hf(tiny_hf("qwen3"), tmp_path / "out", format="torch_dist", workers=2)
    assert time.monotonic() - started < 60
    assert list(tmp_path.iterdir()) == [tmp_path / "out.lock"] or not list(tmp_path.iterdir())


def test_a_missing_part_is_refused(tiny_hf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent checks the merged chunk tables against the whole model: a process's part that never arrives is an
    error, not a checkpoint with a tensor missing."""
    from bridge.converters import dcp_parts

    merged = dcp_parts.write_metadata
    monkeypatch.setattr(dcp_parts, "write_metadata", lambda folder, parts, expected=None: merged(folder, parts[1:], expected))
    with pytest.raises(BridgeError, match="do not hold every entry once: missing"):
        api.import_hf(tiny_hf("qwen3"), tmp_path / "out", format="torch_dist", workers=2)
    assert not (tmp_path / "out").exists()


def test_workers_flag_errors(tiny_hf, tmp_path: Path) -> None:
    with pytest.raises(BridgeError, match="--workers 2 writes --format torch_dist"):
        api.import_hf(tiny_hf("qwen3"), tmp_path / "t", workers=2)
    with pytest.raises(BridgeError, match="--workers 0 must be 1 or more"):
        api.import_hf(tiny_hf("qwen3"), tmp_path / "t", format="torch_dist", workers=0)
