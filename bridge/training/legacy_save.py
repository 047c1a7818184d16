"""Training checkpoints in Megatron's legacy `torch` format, streamed tensor by tensor.

The writer rank of each (TP, PP, EP) shard writes `mp_rank_XX[_YYY][_EEE]/model_optim_rng.pt` with
`IncrementalTorchWriter`: each tensor goes to the file as soon as it is on the host, so host memory holds
one tensor, not the shard. The optimizer state is whole tensors per weight name (loadable at any DP size,
sharded or not). With the distributed optimizer it is gathered over DP one bucket at a time (one bucket of
GPU memory while it is gathered) and written to `distrib_optim.pt` beside `model_optim_rng.pt`, the path
Megatron-LM's `get_distributed_optimizer_checkpoint_name` gives; its content is bridge's name-keyed state,
not Megatron-LM's per-bucket buffers, which depend on its bucket layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from bridge.converters.megatron_legacy import CHECKPOINT_VERSION, FILE_NAME, model_keys
from bridge.converters.torch_zip import IncrementalTorchWriter
from bridge.nn.lora import checkpoint_state
from bridge.parallel.state import ParallelState
from bridge.training.grads import Entry
from bridge.training.optimizer import STATE_NAMES, MixedPrecisionAdamW, state_key
from bridge.training.rng import rng_state
from bridge.training.staging import HostStager

DISTRIB_OPTIM_FILE = "distrib_optim.pt"


def write_rank_files(tmp: Path, iteration: int, ps: ParallelState, chunks: Sequence[nn.Module],
                     optimizer: MixedPrecisionAdamW, entries: dict[str, Any], stager: HostStager) -> None:
    """Collective with the distributed optimizer (its per-bucket gathers); writer ranks write their files."""
    writes = ps.writes_checkpoint
    sharded = _sharded(optimizer)
    folder = tmp / ps.layout.rank_dir(ps.tp_rank, ps.pp_rank, ps.ep_rank)
    main = opt = None
    state: dict[str, Any] = {"args": entries["args"], "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
    if writes:
        folder.mkdir(parents=True, exist_ok=True)
        main = IncrementalTorchWriter(folder / FILE_NAME)
        opt = IncrementalTorchWriter(folder / DISTRIB_OPTIM_FILE) if sharded else main
        for key, chunk in zip(model_keys(ps.layout), chunks):
            state[key] = {name: main.tensor(stager.host(t)) for name, t in checkpoint_state(chunk).items()}
    params: dict[str, dict[str, Any]] = {}
    for entry, name, tensor in _optimizer_tensors(optimizer, ps, stager, sharded):
        params.setdefault(state_key(optimizer.chunks, entry), {})[name] = opt.tensor(tensor.view(entry.param.shape))
    if not writes:
        return
    header = optimizer.header()
    if sharded:
        opt.close({**header, "params": params})
        state["optimizer"] = {**header, "params_file": DISTRIB_OPTIM_FILE}
    else:
        state["optimizer"] = {**header, "params": params}
    rng = [{k: main.tensor(t) for k, t in generators.items()} for generators in rng_state()]
    state.update(opt_param_scheduler=entries["opt_param_scheduler"], rng_state=rng, train_state=entries["train_state"])
    main.close(state)


def _sharded(optimizer: MixedPrecisionAdamW) -> bool:
    """Whether some bucket's optimizer state is split over several ranks."""
    buffer = optimizer.buffer
    return buffer.distributed and any(buffer.group(b)[1] > 1 for b in buffer.buckets)


def _optimizer_tensors(optimizer: MixedPrecisionAdamW, ps: ParallelState, stager: HostStager,
                       sharded: bool) -> Iterator[tuple[Entry, str, torch.Tensor]]:
    """(entry, state name, host tensor) of every weight, for writer ranks. Sharded: every rank takes part in each
    bucket's gather (one bucket of one state at a time on the device)."""
    if not sharded:
        if ps.writes_checkpoint:
            for p in optimizer.pieces:  # unsharded: one piece per weight, the whole of it
                for name in STATE_NAMES:
                    yield p.entry, name, stager.host(p.state(name))
        return
    buffer = optimizer.buffer
    for bucket in buffer.buckets:
        group, n, _ = buffer.group(bucket)
        lo, hi = buffer.shard(bucket)
        span = next(s for s in optimizer.spans if s.lo <= lo and hi <= s.hi)
        for name in STATE_NAMES:
            shard = span.state(name, lo - span.lo, hi - span.lo)
            full = shard
            if n > 1:
                full = torch.empty(bucket.end - bucket.start, dtype=shard.dtype, device=shard.device)
                dist.all_gather(list(full.chunk(n)), shard, group=group)
            if ps.writes_checkpoint:
                for e in bucket.entries:
                    yield e, name, stager.host(full[e.start - bucket.start:e.start - bucket.start + e.numel])
            del full
