"""torch_dist: bit-exact round trips, Megatron's on-disk facts, rank shards equal to the legacy files, lazy reads.

The round trips prove that writing and reading torch_dist are inverse, not that either is right; Megatron Core's
own dist_checkpointing loading bridge's folders and saving ones bridge reads (tests/interop/) does that.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from bridge import api
from bridge.checkpoint import CheckpointMeta
from bridge.converters import dcp as bridge_dcp
from bridge.converters.megatron_legacy import LegacyCheckpointReader
from bridge.converters.torch_dist import BACKEND_CONFIG, TorchDistReader, open_rank_reader
from bridge.layout import ParallelLayout
from bridge.models import conversions
from tests.model_fixtures import DENSE_MODELS, load_pt
from tests.test_convert_roundtrip import assert_identical

LEGACY_LAYOUTS = [ParallelLayout(tp=2, pp=2), ParallelLayout(pp=2, vpp=2), ParallelLayout(tp=4)]


def hf_tensor(folder: Path, name: str) -> torch.Tensor:
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(name)


@pytest.mark.parametrize("arch", sorted(DENSE_MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hf_torch_dist_hf_is_bit_exact(arch: str, dtype: torch.dtype, tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf(arch, dtype=dtype)
    impl = "local" if dtype == torch.bfloat16 else "transformer_engine"
    ckpt = api.import_hf(src, tmp_path / "dist", ParallelLayout(tp=2), format="torch_dist", transformer_impl=impl)
    assert json.loads((ckpt / "bridge.json").read_text())["format"] == "torch_dist"
    assert_identical(src, api.export_hf(ckpt, tmp_path / "hf"))


@pytest.mark.parametrize("arch", ["llama32-tied", "qwen2", "qwen3"])
def test_torch_to_torch_dist_to_torch_is_bit_exact(arch: str, tiny_hf, tmp_path: Path) -> None:
    """Every rank file after legacy -> torch_dist -> legacy equals the original, key order included."""
    src = tiny_hf(arch)
    for i, layout in enumerate(LEGACY_LAYOUTS):
        impl = "local" if i == 1 else "transformer_engine"
        legacy = api.import_hf(src, tmp_path / f"legacy{i}", layout, transformer_impl=impl)
        dist = api.reshard(legacy, tmp_path / f"dist{i}", ParallelLayout(), format="torch_dist")
        back = api.reshard(dist, tmp_path / f"back{i}", layout, format="torch")
        assert api.inspect_checkpoint(back)["format"] == "torch"
        a, b = LegacyCheckpointReader(legacy, layout), LegacyCheckpointReader(back, layout)
        for tp_rank, pp_rank in layout.ranks():
            sa, sb = a.load_rank(tp_rank, pp_rank), b.load_rank(tp_rank, pp_rank)
            for key in [k for k in sa if k.startswith("model")]:
                assert list(sa[key]) == list(sb[key]), (layout.name, key)
                for name in sa[key]:
                    assert sa[key][name].dtype == sb[key][name].dtype and torch.equal(sa[key][name], sb[key][name]), name


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_rank_shards_equal_legacy_files(impl: str, tiny_hf, tmp_path: Path) -> None:
    """What `bridge verify` / training load from torch_dist is exactly the legacy rank file, for any layout."""
    src = tiny_hf("llama32-tied")
    dist = api.import_hf(src, tmp_path / "dist", ParallelLayout(), format="torch_dist", transformer_impl=impl)
    meta = CheckpointMeta.load(dist)
    reader = open_rank_reader(dist, meta, conversions(meta.config))
    assert isinstance(reader, TorchDistReader)
    for i, layout in enumerate(LEGACY_LAYOUTS):
        legacy = LegacyCheckpointReader(api.import_hf(src, tmp_path / f"l{i}", layout, transformer_impl=impl), layout)
        for tp_rank, pp_rank in layout.ranks():
            want, got = legacy.load_rank(tp_rank, pp_rank), reader.load_rank(tp_rank, pp_rank, layout)
            assert got["args"].ckpt_format == "torch_dist"
            for key in [k for k in want if k.startswith("model")]:
                assert list(got[key]) == list(want[key]), (layout.name, tp_rank, pp_rank, key)
                for name, tensor in want[key].items():
                    assert torch.equal(got[key][name], tensor), (layout.name, name)


def test_megatron_on_disk_facts(tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf("llama31")
    ckpt = api.import_hf(src, tmp_path / "dist", ParallelLayout(tp=2), format="torch_dist", common_pt=True)
    folder = ckpt / "release"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert json.loads((folder / "metadata.json").read_text()) == BACKEND_CONFIG
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json",
                                                        "run_config.yaml"]
    common = load_pt(folder / "common.pt")
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0 and common["args"].tensor_model_parallel_size == 2
    # Megatron Core 0.19's copy: the ShardedObject `common_state`, a DCP byte entry holding torch.save([state])
    blob = {"common_state/shard_0_1": io.BytesIO()}
    dcp.load(blob, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = blob["common_state/shard_0_1"]  # DCP gives the bytes, or the object it loaded from them
        (inside,) = torch.load(io.BytesIO(loaded.getvalue()), weights_only=True) if isinstance(loaded, io.BytesIO) else loaded
    assert vars(inside["args"]) == vars(common["args"]) and inside["iteration"] == 0
    md = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    L, h = 4, 64
    fc1 = md["decoder.layers.mlp.linear_fc1.weight"]
    assert tuple(fc1.size) == (L, 2 * 128, h) and len(fc1.chunks) == L  # one chunk per layer: written streaming
    assert [tuple(c.offsets) for c in fc1.chunks] == [(layer, 0, 0) for layer in range(L)]
    assert tuple(md["embedding.word_embeddings.weight"].size) == (512, h)  # vocab 300 padded to 128 * TP
    extra = sorted(k for k in md if "_extra_state" in k)
    assert len(extra) == 4 * L and "decoder.layers.mlp.linear_fc2._extra_state/shard_3_4" in extra
    assert not any("core_attention" in k or k.startswith("decoder.layers.0.") for k in md)
    # torch's own DCP loader reads the whole folder without a process group
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.items() if hasattr(v, "size")}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    gate, up = hf_tensor(src, "model.layers.2.mlp.gate_proj.weight"), hf_tensor(src, "model.layers.2.mlp.up_proj.weight")
    assert torch.equal(state["decoder.layers.mlp.linear_fc1.weight"][2], torch.cat([gate, up]))  # [gate_full; up_full]
    assert torch.equal(state["output_layer.weight"][:300], hf_tensor(src, "lm_head.weight"))
    assert not state["output_layer.weight"][300:].any()


def test_tied_embeddings_store_no_output_layer(tiny_hf, tmp_path: Path) -> None:
    ckpt = api.import_hf(tiny_hf("qwen3-tied"), tmp_path / "dist", ParallelLayout(pp=2), format="torch_dist")
    md = dcp.FileSystemReader(str(ckpt / "release")).read_metadata().state_dict_metadata
    assert "output_layer.weight" not in md and "decoder.layers.self_attention.q_layernorm.weight" in md


def test_reads_one_layer_slice_at_a_time(tiny_hf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = api.import_hf(tiny_hf("qwen2"), tmp_path / "dist", ParallelLayout(), format="torch_dist")
    regions: list[tuple[str, tuple[int, ...]]] = []
    original = bridge_dcp.DcpReader.read

    def spy(self, key, offsets, sizes):  # noqa: ANN001, ANN202
        regions.append((key, tuple(sizes)))
        return original(self, key, offsets, sizes)

    monkeypatch.setattr(bridge_dcp.DcpReader, "read", spy)
    api.export_hf(ckpt, tmp_path / "hf")
    stacked = [sizes for key, sizes in regions if key.startswith("decoder.layers.")]
    assert stacked and all(sizes[0] == 1 for sizes in stacked)
    assert len(regions) == len(conversions(CheckpointMeta.load(ckpt).config))


def test_cli_import_inspect_reshard(tiny_hf, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bridge.cli.main import main

    src, out = tiny_hf("mistral"), tmp_path / "dist"
    assert main(["import", str(src), "--out", str(out), "--ckpt-format", "torch_dist", "--tp", "2"]) == 0
    assert main(["inspect", str(out)]) == 0
    assert "format        torch_dist" in capsys.readouterr().out
    assert main(["reshard", str(out), "--out", str(tmp_path / "legacy"), "--tp", "2", "--format", "torch"]) == 0
    assert main(["export", str(tmp_path / "legacy"), "--out", str(tmp_path / "hf")]) == 0
    assert_identical(src, tmp_path / "hf")


def test_verify_loads_torch_dist_ranks(tiny_hf, tmp_path: Path) -> None:
    """`bridge verify` on a torch_dist folder: spawned TP=2 ranks each read their shard, logits match HF."""
    from bridge.apps.verify import verify

    src = tiny_hf("qwen2")
    ckpt = api.import_hf(src, tmp_path / "dist", ParallelLayout(tp=2), format="torch_dist")
    result = verify(src, ckpt, write_json=False)
    assert result.passed and result.overall.top1 == 1.0, result.criterion
