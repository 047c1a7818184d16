"""A multi-shard model from the Hub (every model above ~5 GB): `bridge import <repo id>` from the HF cache,
whose snapshot files are symlinks into `blobs/`, online, offline and from a `snapshot_download` folder.

Each import is checked by exporting it back and comparing every tensor bit for bit with the shards that
were pushed, read with safetensors itself (not with bridge's reader).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants, snapshot_download
from safetensors.torch import load_file

from bridge.cli.main import main
from bridge.apps.push import push_to_hub
from tests.hub_fixture import TOKEN, USER, point_hub_client_at, save_tiny_llama
from tests.hub_server import HubServer

REPO = f"{USER}/sharded"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in `folder`, by name (a name in two files is a test failure)."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        part = load_file(shard)
        assert not out.keys() & part.keys(), f"{shard} repeats {sorted(out.keys() & part.keys())}"
        out.update(part)
    return out


@pytest.fixture
def sharded(hub, tmp_path: Path) -> Path:
    """REPO on the test Hub: a tiny Llama saved in 3+ shards with an index, as large models are published."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "single")).save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    push_to_hub(folder, REPO, token=TOKEN)
    return folder


def _import_and_check(source: str, out: Path, capsys: pytest.CaptureFixture, reference: Path) -> None:
    """`bridge import source --tp 2`, `bridge export`: the exported tensors equal the pushed shards exactly."""
    ckpt, back = out / "ckpt", out / "back"
    code = main(["import", source, "--tp", "2", "--out", str(ckpt)])
    assert code == 0, capsys.readouterr().err
    assert main(["export", str(ckpt), "--out", str(back)]) == 0, capsys.readouterr().err
    want, got = _tensors(reference), _tensors(back)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_import_sharded_repo_online_then_offline_from_the_cache(hub, sharded, tmp_path, monkeypatch, capsys):
    hf_home = tmp_path / "fresh_hf_home"
    point_hub_client_at(hub.url, hf_home, monkeypatch)
    _import_and_check(REPO, tmp_path / "online", capsys, sharded)
    snapshot = next((hf_home / "hub").glob("models--me--sharded/snapshots/*"))
    assert all(p.is_symlink() for p in snapshot.glob("*.safetensors"))  # the cache layout the import read

    with HubServer() as dead:
        dead_url = dead.url  # nothing listens here once it stops: any network use would fail
    point_hub_client_at(dead_url, hf_home, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _import_and_check(REPO, tmp_path / "offline", capsys, sharded)


def test_import_sharded_snapshot_download_folder(hub, sharded, tmp_path, capsys):
    folder = snapshot_download(REPO, token=TOKEN)
    _import_and_check(folder, tmp_path / "local", capsys, sharded)


def _cache_like_folder(tmp_path: Path) -> Path:
    """Two shards and an index in `snapshots/rev/`, the shards being symlinks into `../../blobs/` as in the HF cache."""
    from safetensors.torch import save_file

    blobs, folder = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    folder.mkdir(parents=True)
    weight_map = {}
    for i, name in enumerate(("a.weight", "b.weight")):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({name: torch.full((2, 2), float(i))}, str(blobs / f"blob{i}"))
        (folder / shard).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
        weight_map[name] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("escape", ["../../etc/x.safetensors", "ABSOLUTE", "sub/../../x.safetensors"])
def test_index_path_check_is_on_the_name_not_the_symlink_target(tmp_path, escape):
    from bridge.converters.hf import SafetensorsReader
    from bridge.errors import BridgeError

    folder = _cache_like_folder(tmp_path)
    reader = SafetensorsReader(folder)
    assert reader.names() == {"a.weight", "b.weight"}
    assert torch.equal(reader.get("b.weight"), torch.ones(2, 2))
    target = tmp_path / "etc" / "x.safetensors"  # exists, so only the path check can refuse it
    target.parent.mkdir()
    target.symlink_to(tmp_path / "blobs" / "blob1")
    rel = str(target) if escape == "ABSOLUTE" else escape
    (folder / "sub").mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": rel}}))
    with pytest.raises(BridgeError, match=f"weight_map path '{rel}' for b.weight points outside .*refusing to read it"):
        SafetensorsReader(folder)


def test_tensor_in_two_shards_without_an_index_is_refused(tmp_path):
    from safetensors.torch import save_file

    from bridge.converters.hf import SafetensorsReader
    from bridge.errors import BridgeError

    save_file({"a.weight": torch.zeros(2), "b.weight": torch.zeros(2)}, str(tmp_path / "model-1.safetensors"))
    save_file({"b.weight": torch.ones(2)}, str(tmp_path / "model-2.safetensors"))
    with pytest.raises(BridgeError, match="tensor b.weight is in both .*model-1.safetensors and .*model-2.safetensors;") as err:
        SafetensorsReader(tmp_path)
    assert "\n" not in str(err.value)
