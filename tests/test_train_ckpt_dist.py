"""torch_dist training checkpoints: sharded writes, exact resume, resume on another layout, async saves, bounded
staging, and export, push and inspect of a training checkpoint.

One uninterrupted DP=2 run with the distributed optimizer (tiny Llama, fp32, 5 iterations) saves at iterations 2, 4
and 5; a copy tracked at 2 is the checkpoint the resumes start from, and the full run's losses and its checkpoint at
5 are the reference.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import snapshot_download
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from bridge.api import export_hf, import_hf, inspect_checkpoint
from bridge.cli.main import main
from bridge.converters.dcp import DcpReader
from bridge.converters.megatron_legacy import TRACKER, read_tracker
from bridge.converters.torch_dist import read_common_state
from bridge.launch import launch
from bridge.training import TrainConfig, train
from bridge.training.rng import rng_from_bytes
from tests.hub_fixture import TOKEN, USER
from tests.model_fixtures import write_random_corpus
from tests.test_convert_roundtrip import assert_identical

pytestmark = pytest.mark.slow

ITERS, INTERVAL = 5, 2


def _at(run: Path, iteration: int, out: Path) -> Path:
    """A copy of `run` whose newest checkpoint is `iteration`."""
    shutil.copytree(run, out)
    for folder in out.glob("iter_*"):
        if folder.name != f"iter_{iteration:07d}":
            shutil.rmtree(folder)
    (out / TRACKER).write_text(str(iteration))
    return out


def _config(load: Path, data: Path, save: Path, **kw: Any) -> TrainConfig:
    base = dict(load=str(load), data_path=[str(data)], micro_batch_size=2, global_batch_size=8, seq_length=32,
                train_iters=ITERS, lr=1e-3, lr_warmup_iters=2, eval_interval=0, eval_iters=1, progress=False,
                save=str(save), nproc=2, device="cpu", ckpt_format="torch_dist", save_interval=INTERVAL)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def dense(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ckpt-dist")
    ckpt = import_hf(tiny_hf("llama31"), root / "ckpt")
    data = write_random_corpus(root / "corpus", seed=1, documents=60)
    full = train(_config(ckpt, data, root / "full", use_distributed_optimizer=True))
    return {"root": root, "ckpt": ckpt, "data": data, "full": full, "at2": _at(root / "full", 2, root / "at2")}


def _losses(summary: dict[str, Any]) -> list[float]:
    return [loss for _, loss in summary["loss_curve"]]


def _blob(reader: DcpReader, key: str) -> bytes:
    info = reader.metadata.storage_data[MetadataIndex(key)]
    with open(reader.folder / info.relative_path, "rb") as handle:
        handle.seek(info.offset)
        return handle.read(info.length)


def _assert_same_state(a_folder: Path, b_folder: Path) -> None:
    """Two checkpoint folders hold the same keys, every tensor (model and optimizer state) bitwise, and the same RNG
    state per rank."""
    a, b = DcpReader(a_folder), DcpReader(b_folder)
    assert sorted(a.metadata.state_dict_metadata) == sorted(b.metadata.state_dict_metadata)
    for key in a.tensor_keys():
        shape = list(a.tensor_meta(key).size)
        assert torch.equal(a.read(key, [0] * len(shape), shape), b.read(key, [0] * len(shape), shape)), key
    rng = [k for k, v in a.metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)
           and k.startswith("rng_state/")]
    assert len(rng) == 2
    for key in rng:
        sa, sb = rng_from_bytes(_blob(a, key)), rng_from_bytes(_blob(b, key))
        assert sa[0].keys() == sb[0].keys() and all(torch.equal(sa[0][k], sb[0][k]) for k in sa[0]), key


def _elements_per_file(folder: Path, prefix: str) -> dict[str, int]:
    reader = DcpReader(folder)
    counts: dict[str, int] = {}
    for key, entry in reader.metadata.state_dict_metadata.items():
        if key.startswith(prefix) and hasattr(entry, "chunks"):
            for chunk in entry.chunks:
                info = reader.metadata.storage_data[MetadataIndex(key, torch.Size(chunk.offsets))]
                counts[info.relative_path] = counts.get(info.relative_path, 0) + torch.Size(chunk.sizes).numel()
    return counts


def test_each_dp_rank_writes_only_its_shard(dense: dict[str, Any]) -> None:
    folder = dense["at2"] / "iter_0000002"
    optimizer = _elements_per_file(folder, "optimizer.")
    model = _elements_per_file(folder, "decoder.")
    total = sum(optimizer.values())
    assert set(optimizer) == {"__0_0.distcp", "__1_0.distcp"}
    assert all(abs(n - total / 2) <= 0.02 * total for n in optimizer.values()), optimizer  # half each (bucket padding)
    assert set(model) == {"__0_0.distcp"}  # the model once, by DP rank 0
    sizes = {p.name: p.stat().st_size for p in folder.glob("*.distcp")}
    assert sizes["__1_0.distcp"] < 4 * (total / 2) * 1.1  # rank 1: its optimizer shard and nothing else
    # Megatron Core 0.19's layout: no common.pt, the common state is rank 0's DCP byte entry
    assert json.loads((folder / "metadata.json").read_text()) == {"sharded_backend": "torch_dist",
                                                                  "sharded_backend_version": 1}
    assert not (folder / "common.pt").exists()
    common = read_common_state(folder, DcpReader(folder))
    assert common["iteration"] == 2 and common["train_state"]["iteration"] == 2 and "optimizer" in common


def test_resume_at_the_same_layout_is_bitwise_exact(dense: dict[str, Any]) -> None:
    root = dense["root"]
    resumed = train(_config(dense["at2"], dense["data"], root / "same", use_distributed_optimizer=True))
    assert _losses(resumed) == _losses(dense["full"])  # the restored curve 1..2, then 3..5 bitwise
    _assert_same_state(root / "full" / "iter_0000005", root / "same" / "iter_0000005")


def test_master_remainders_are_saved_whole_and_resume_bitwise(dense: dict[str, Any]) -> None:
    """bf16 with --use-precision-aware-optimizer and the distributed optimizer: the checkpoint holds fp32 masters
    (rebuilt from the bf16 weights and their remainders), and a resume splits them again into the same state."""
    root, flags = dense["root"], dict(use_distributed_optimizer=True, bf16=True, use_precision_aware_optimizer=True)
    full = train(_config(dense["ckpt"], dense["data"], root / "rem-full", **flags))
    at2 = _at(root / "rem-full", 2, root / "rem-at2")
    assert DcpReader(at2 / "iter_0000002").tensor_meta(
        "optimizer.state.fp32_param.decoder.layers.self_attention.linear_proj.weight").properties.dtype == torch.float32
    resumed = train(_config(at2, dense["data"], root / "rem-same", **flags))
    assert _losses(resumed) == _losses(full)
    _assert_same_state(root / "rem-full" / "iter_0000005", root / "rem-same" / "iter_0000005")


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}], ids=["tp2", "pp2"])
def test_resume_on_another_layout(dense: dict[str, Any], layout: dict[str, int]) -> None:
    name = "-".join(f"{k}{v}" for k, v in layout.items())
    resumed = train(_config(dense["at2"], dense["data"], dense["root"] / name, **layout))
    assert [it for it, _ in resumed["loss_curve"]] == [1, 2, 3, 4, 5]
    torch.testing.assert_close(torch.tensor(_losses(resumed)[2:]), torch.tensor(_losses(dense["full"])[2:]),
                               rtol=1e-5, atol=0)


def test_moe_ep2_resumes_at_ep1(tiny_hf, tmp_path: Path, dense: dict[str, Any]) -> None:
    ckpt = import_hf(tiny_hf("mixtral"), tmp_path / "ckpt")
    full = train(_config(ckpt, dense["data"], tmp_path / "full", ep=2, use_distributed_optimizer=True))
    at2 = _at(tmp_path / "full", 2, tmp_path / "at2")
    resumed = train(_config(at2, dense["data"], tmp_path / "ep1", ep=1))
    torch.testing.assert_close(torch.tensor(_losses(resumed)[2:]), torch.tensor(_losses(full)[2:]), rtol=1e-5, atol=0)


KILLED_SAVE = 4  # the async save in flight when the run is killed


def _all_ranks_at(marks: Path, rank: int, world: int) -> None:
    """Wait until every rank has reached this point. Files, not a collective: a rank killed right after a collective
    could take bytes a peer still had to read with it."""
    (marks / f"rank{rank}").touch()
    deadline = time.monotonic() + 300
    while len(list(marks.iterdir())) < world:
        if time.monotonic() > deadline:
            raise RuntimeError("another rank never reached the point where the run is killed")
        time.sleep(0.01)


def _killed_in_async_save(cfg: TrainConfig, plan: Any, marks: str) -> None:
    """Rank body: the background write of checkpoint 4 stops half-way and stays in flight while training goes on
    (iteration 5); where the run must complete that save (at its final save), every rank is killed (SIGKILL: no
    cleanup)."""
    import torch.distributed as dist

    import bridge.training.dist_save as ds
    from bridge.training.loop import train_rank
    from bridge.training.saver import Checkpointer

    real_write, real_finalize = ds.write_files, Checkpointer.finalize
    stalled, never = threading.Event(), threading.Event()

    def write_half(folder: Path, staged: Any, stager: Any) -> Any:
        if folder.name != f"iter_{KILLED_SAVE:07d}.tmp":
            return real_write(folder, staged, stager)
        (folder / f"__{staged.rank}_0.distcp").write_bytes(b"PK\x03\x04 half")
        stalled.set()
        never.wait(300)  # the process is killed while this write is in flight
        raise RuntimeError("the run was not killed")

    def killed_at_finalize(self: Checkpointer) -> None:
        if self.pending is not None and self.pending.iteration == KILLED_SAVE:
            assert stalled.wait(300)
            _all_ranks_at(Path(marks), dist.get_rank(), dist.get_world_size())
            os.kill(os.getpid(), signal.SIGKILL)
        real_finalize(self)

    ds.write_files = write_half
    Checkpointer.finalize = killed_at_finalize  # type: ignore[method-assign]
    train_rank(cfg, plan)


def test_async_save_killed_in_flight_resumes_from_the_previous(dense: dict[str, Any], tmp_path: Path) -> None:
    from bridge.training.plan import make_plan

    run, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    kw = dict(use_distributed_optimizer=True, async_save=True)
    cfg = _config(dense["ckpt"], dense["data"], run, **kw, nproc=None)
    plan = make_plan(TrainConfig(**{**cfg.__dict__, "nproc": 2}))
    with pytest.raises(RuntimeError, match="stopped before reporting"):
        launch(_killed_in_async_save, 2, cfg, plan, str(marks))
    assert read_tracker(run) == 2 and not (run / "iter_0000004").exists()
    assert sorted(p.name for p in (run / "iter_0000004.tmp").iterdir()) == ["__0_0.distcp", "__1_0.distcp"]
    logged = [json.loads(line)["iteration"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]  # training went on while the save was in flight
    resumed = train(_config(run, dense["data"], run, **kw))
    assert _losses(resumed) == _losses(dense["full"])
    assert read_tracker(run) == 5 and not (run / "iter_0000004.tmp").exists()
    _assert_same_state(dense["root"] / "full" / "iter_0000005", run / "iter_0000005")


def test_export_push_and_inspect_read_a_training_checkpoint(dense: dict[str, Any], hub, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from bridge.apps.push import push_to_hub

    full = dense["root"] / "full"
    legacy = train(_config(dense["ckpt"], dense["data"], tmp_path / "legacy", use_distributed_optimizer=True,
                           ckpt_format="torch"))
    assert _losses(legacy) == _losses(dense["full"])  # the same run, saved in the legacy format
    exported = export_hf(full, tmp_path / "dist-hf")
    assert_identical(export_hf(tmp_path / "legacy", tmp_path / "legacy-hf"), exported)  # the trainer's weights, bitwise
    repo = f"{USER}/trained"
    push_to_hub(full, repo, token=TOKEN)
    pushed = Path(snapshot_download(repo, token=TOKEN))
    assert_identical(exported, pushed)
    assert "| Iterations | 5 |" in (pushed / "README.md").read_text()
    assert main(["inspect", str(full), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "torch_dist" and info["iteration"] == 5
    assert info["parameters"] == inspect_checkpoint(tmp_path / "legacy")["parameters"]
    assert {f["path"] for f in info["files"]} == {f"iter_0000005/{name}" for name in
                                                  ("__0_0.distcp", "__1_0.distcp", ".metadata")}


def _staging_peaks(runs: list[tuple[TrainConfig, Any]], limit: int) -> list[dict[str, int]]:
    """Rank body: save each run's rank state with a staging limit; the largest piece staged and the model's size."""
    from bridge.training import dist_save
    from bridge.training.staging import HostStager
    from bridge.training.state import setup_rank

    peaks = []
    for cfg, plan in runs:
        rs = setup_rank(cfg, plan)
        stager = HostStager(rs.device, limit_bytes=limit)
        view = dist_save.RankView(rs.ps, rs.chunks, rs.optimizer, plan.model, plan.transformer_impl)
        folder = Path(cfg.save) / "probe"
        folder.mkdir(parents=True)
        dist_save.write_files(folder, dist_save.stage(view, 0, rs.entries(), stager, keep=False), stager)
        largest = max(e.param.numel() * e.param.element_size() for e in rs.buffer.entries)
        peaks.append({"peak": stager.peak_bytes, "largest": largest, "params": rs.buffer.param_data.numel()})
    return peaks


def test_host_staging_does_not_grow_with_the_model(tiny_hf, tmp_path: Path) -> None:
    from bridge.training.plan import make_plan

    runs = []
    for layers in (1, 8):
        hf = tiny_hf("llama31", num_hidden_layers=layers)
        cfg = TrainConfig(model_config=str(hf / "config.json"), mock_data=True, seq_length=16, train_iters=1, global_batch_size=1,
                          progress=False, device="cpu", save=str(tmp_path / f"l{layers}"), ckpt_format="torch_dist")
        runs.append((cfg, make_plan(TrainConfig(**{**cfg.__dict__, "nproc": 1}))))
    small, big = peaks = launch(_staging_peaks, 1, runs, 4096)[0]
    assert big["params"] > 3.5 * small["params"] and small["largest"] > 4 * 4096
    assert small["peak"] <= 4096 and big["peak"] <= 4096, json.dumps(peaks)
