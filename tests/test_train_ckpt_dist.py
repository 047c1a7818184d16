"""torch_dist training checkpoints: sharded writes, exact resume, resume on another layout, async saves, bounded staging.

One uninterrupted DP=2 run with the distributed optimizer (tiny Llama, fp32) saves at iterations 3 and 6; a copy
tracked at 3 is the checkpoint every resume starts from, and the full run's losses 4..6 are the reference.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from bridge.api import import_hf
from bridge.converters.dcp import DcpReader
from bridge.converters.megatron_legacy import TRACKER, read_tracker
from bridge.launch import launch
from bridge.training import TrainConfig, train
from tests.model_fixtures import write_random_corpus

pytestmark = pytest.mark.slow


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
                train_iters=6, lr=1e-3, lr_warmup_iters=2, eval_interval=0, progress=False, save=str(save), nproc=2,
                device="cpu", ckpt_format="torch_dist", save_interval=3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def dense(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ckpt-dist")
    ckpt = import_hf(tiny_hf("llama31"), root / "ckpt")
    data = write_random_corpus(root / "corpus", seed=1, documents=60)
    full = train(_config(ckpt, data, root / "full", use_distributed_optimizer=True))
    return {"root": root, "data": data, "full": full, "at3": _at(root / "full", 3, root / "at3")}


def _losses(summary: dict[str, Any]) -> list[float]:
    return [loss for _, loss in summary["loss_curve"]]


def _elements_per_file(folder: Path, prefix: str) -> dict[str, int]:
    reader = DcpReader(folder)
    counts: dict[str, int] = {}
    for key, entry in reader.metadata.state_dict_metadata.items():
        if key.startswith(prefix) and hasattr(entry, "chunks"):
            for chunk in entry.chunks:
                info = reader.metadata.storage_data[_index(key, chunk.offsets)]
                counts[info.relative_path] = counts.get(info.relative_path, 0) + torch.Size(chunk.sizes).numel()
    return counts


def _index(key: str, offsets: Any) -> Any:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return MetadataIndex(key, torch.Size(offsets))


def test_each_dp_rank_writes_only_its_shard(dense: dict[str, Any]) -> None:
    folder = dense["at3"] / "iter_0000003"
    optimizer = _elements_per_file(folder, "optimizer.")
    model = _elements_per_file(folder, "decoder.")
    total = sum(optimizer.values())
    assert set(optimizer) == {"__0_0.distcp", "__1_0.distcp"}
    assert all(abs(n - total / 2) <= 0.02 * total for n in optimizer.values()), optimizer  # half each (bucket padding)
    assert set(model) == {"__0_0.distcp"}  # the model once, by DP rank 0
    sizes = {p.name: p.stat().st_size for p in folder.glob("*.distcp")}
    assert sizes["__1_0.distcp"] < 4 * (total / 2) * 1.1  # rank 1: its optimizer shard and nothing else
    assert (folder / "metadata.json").is_file() and (folder / "common.pt").is_file()


def test_resume_at_the_same_layout_is_bitwise_exact(dense: dict[str, Any]) -> None:
    root = dense["root"]
    resumed = train(_config(dense["at3"], dense["data"], root / "same", use_distributed_optimizer=True))
    assert _losses(resumed) == _losses(dense["full"])  # the restored curve 1..3, then 4..6 bitwise
    a, b = DcpReader(root / "full" / "iter_0000006"), DcpReader(root / "same" / "iter_0000006")
    for key in a.tensor_keys():  # model and optimizer state, every element
        shape = list(a.tensor_meta(key).size)
        assert torch.equal(a.read(key, [0] * len(shape), shape), b.read(key, [0] * len(shape), shape)), key


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}], ids=["tp2", "pp2"])
def test_resume_on_another_layout(dense: dict[str, Any], layout: dict[str, int]) -> None:
    name = "-".join(f"{k}{v}" for k, v in layout.items())
    resumed = train(_config(dense["at3"], dense["data"], dense["root"] / name, **layout))
    assert [it for it, _ in resumed["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor(_losses(resumed)[3:]), torch.tensor(_losses(dense["full"])[3:]),
                               rtol=1e-5, atol=0)


def test_moe_ep2_resumes_at_ep1(tiny_hf, tmp_path: Path, dense: dict[str, Any]) -> None:
    ckpt = import_hf(tiny_hf("mixtral"), tmp_path / "ckpt")
    full = train(_config(ckpt, dense["data"], tmp_path / "full", ep=2, use_distributed_optimizer=True))
    at3 = _at(tmp_path / "full", 3, tmp_path / "at3")
    resumed = train(_config(at3, dense["data"], tmp_path / "ep1", ep=1))
    torch.testing.assert_close(torch.tensor(_losses(resumed)[3:]), torch.tensor(_losses(full)[3:]), rtol=1e-5, atol=0)


def _killed_in_async_save(cfg: TrainConfig, plan: Any) -> None:
    """Rank body: the background write of iteration 8 stops half-way, waits until training has finished iteration 9
    (training went on during the save), then the process is killed (SIGKILL: no cleanup)."""
    import bridge.training.dist_save as ds

    real = ds.write_files

    def stalled(folder: Path, staged: Any, stager: Any) -> Any:
        if "iter_0000008" not in str(folder):
            return real(folder, staged, stager)
        (folder / f"__{staged.rank}_0.distcp").write_bytes(b"PK\x03\x04 half")
        log = Path(cfg.save) / "train_log.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and '"iteration": 9' not in log.read_text():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

    ds.write_files = stalled
    from bridge.training.loop import train_rank

    train_rank(cfg, plan)


def test_async_save_killed_in_flight_resumes_from_the_previous(dense: dict[str, Any], tmp_path: Path) -> None:
    from bridge.training.plan import make_plan

    ckpt = dense["at3"].parent / "ckpt"
    kw = dict(nproc=1, train_iters=10, save_interval=4, async_save=True)
    reference = train(_config(ckpt, dense["data"], tmp_path / "ref", **kw))
    assert read_tracker(tmp_path / "ref") == 10 and (tmp_path / "ref" / "iter_0000008" / ".metadata").is_file()
    cfg = _config(ckpt, dense["data"], tmp_path / "run", **{**kw, "nproc": None})
    plan = make_plan(TrainConfig(**{**cfg.__dict__, "nproc": 1}))
    with pytest.raises(RuntimeError, match="rank 0 of 1 failed"):
        launch(_killed_in_async_save, 1, cfg, plan)
    run = tmp_path / "run"
    assert read_tracker(run) == 4 and (run / "iter_0000008.tmp").is_dir() and not (run / "iter_0000008").exists()
    assert '"iteration": 9' in (run / "train_log.jsonl").read_text()
    resumed = train(_config(run, dense["data"], run, **kw))
    assert _losses(resumed) == _losses(reference)
    assert read_tracker(run) == 10 and not (run / "iter_0000008.tmp").exists()


def _staging_peak(cfg: TrainConfig, plan: Any, limit: int) -> dict[str, int]:
    """Rank body: save this rank's state with a staging limit; the largest piece staged and the model's size."""
    from bridge.training import dist_save
    from bridge.training.staging import HostStager
    from bridge.training.state import setup_rank

    rs = setup_rank(cfg, plan)
    stager = HostStager(rs.device, limit_bytes=limit)
    view = dist_save.RankView(rs.ps, rs.chunks, rs.optimizer, plan.model, plan.transformer_impl)
    folder = Path(cfg.save) / "probe"
    folder.mkdir(parents=True)
    dist_save.write_files(folder, dist_save.stage(view, 0, rs.entries(), stager, keep=False), stager)
    largest = max(e.param.numel() * e.param.element_size() for e in rs.buffer.entries)
    return {"peak": stager.peak_bytes, "largest": largest, "params": rs.buffer.param_data.numel()}


def test_host_staging_does_not_grow_with_the_model(tiny_hf, tmp_path: Path) -> None:
    from bridge.training.plan import make_plan

    peaks = []
    for layers in (1, 8):
        hf = tiny_hf("llama31", num_hidden_layers=layers)
        cfg = TrainConfig(model_config=str(hf / "config.json"), mock_data=True, seq_length=16, train_iters=1, global_batch_size=1,
                          progress=False, device="cpu", save=str(tmp_path / f"l{layers}"), ckpt_format="torch_dist")
        plan = make_plan(TrainConfig(**{**cfg.__dict__, "nproc": 1}))
        peaks.append(launch(_staging_peak, 1, cfg, plan, 4096)[0])
    small, big = peaks
    assert big["params"] > 3.5 * small["params"] and small["largest"] > 4 * 4096
    assert small["peak"] <= 4096 and big["peak"] <= 4096, json.dumps(peaks)
