"""Training checkpoints in Megatron's `torch_dist` format, written in parallel by every rank.

    iter_N/__{rank}_0.distcp   each rank's chunks: the model boxes it owns, its optimizer pieces, its RNG blob;
                               rank 0's also the common state (args, iteration, optimizer header, scheduler,
                               train_state) as Megatron Core 0.19 stores it, the byte entry `common_state/shard_0_1`
    iter_N/.metadata           every rank's chunk table, gathered to rank 0 and merged
    iter_N/metadata.json       last: marks the folder complete

The model part is what `bridge import --format torch_dist` writes (stacked `[L, ...]` keys, `_extra_state`
blobs), so Megatron Core, `bridge export` and `bridge push` read it. Optimizer state uses Megatron's
fully reshardable naming (`optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<model key>`, each of the
weight's global shape): a rank writes exactly the global boxes of the flat ranges it owns (its DP shard
with the distributed optimizer), so no rank gathers anything, and any other layout reads back the boxes it
needs. Every box is at most `STAGING_BYTES`, staged to the host one at a time (sync) or copied to host
memory before training goes on (async, `stage(keep=True)`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from bridge.converters.dcp_parts import DcpPart, DcpPartWriter, write_metadata
from bridge.converters.megatron_legacy import CHECKPOINT_VERSION
from bridge.converters.torch_dist import (COMMON_STATE_KEY, CONFIG_FILE, DCP_COMMON_BACKEND_CONFIG, EXTRA_STATE_MODULES,
                                          extra_state_blob, extra_state_key, torch_bytes)
from bridge.errors import BridgeError
from bridge.parallel.state import ParallelState
from bridge.training.optimizer import MixedPrecisionAdamW
from bridge.training.placement import Placement, placement, rank_names
from bridge.training.rng import rng_bytes
from bridge.training.staging import HostStager

#: bridge's optimizer state name -> Megatron's (distrib_optimizer.py, `fully_sharded_model_space`).
OPTIMIZER_STATE = {"master": "fp32_param", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
SHARDING_TYPE = "fully_sharded_model_space"


def optimizer_key(state: str, model_key: str) -> str:
    return f"optimizer.state.{OPTIMIZER_STATE[state]}.{model_key}"


def rng_key(rank: int, world: int) -> str:
    return f"rng_state/shard_{rank}_{world}"


@dataclass
class Chunk:
    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    data: torch.Tensor


@dataclass
class StagedSave:
    """What one rank writes: chunks (device views, or host copies once staged) and blobs (rank 0's: the common state)."""

    rank: int
    chunks: Iterator[Chunk] | list[Chunk]
    blobs: dict[str, bytes]
    meta: dict[str, Any] = field(default_factory=dict)
    ready: Any = None
    """For kept (async) chunks on CUDA: the event after their host copies, waited on before writing."""


@dataclass
class RankView:
    """The part of a rank's training state a torch_dist save reads."""

    ps: ParallelState
    chunks: Sequence[nn.Module]
    optimizer: MixedPrecisionAdamW
    model: Any
    transformer_impl: str


def _placements(view: RankView) -> tuple[dict[tuple[int, str], str], int]:
    ps = view.ps
    return rank_names(view.model, ps.layout, view.transformer_impl, ps.pp_rank, ps.ep_rank), view.model.num_layers


def _writes_weight(ps: ParallelState, place: Placement) -> bool:
    """The first replica writes: DP x CP rank 0 (expert-DP rank 0 for experts), TP rank 0 for replicated weights."""
    first = ps.expert_dp_rank == 0 if place.expert else ps.dp_cp_rank == 0
    return first and (not place.replicated or ps.tp_rank == 0)


def _local_name_key(names: dict[tuple[int, str], str], chunk: int, name: str, tied_copy: bool) -> str | None:
    key = names.get((chunk, name))
    if key is None and not (tied_copy and name == "output_layer.weight"):
        raise BridgeError(f"internal: {name} of model chunk {chunk} has no global name in the torch_dist layout")
    return key


def _boxes(key: str, place: Placement, flat: torch.Tensor, lo: int, hi: int, limit: int) -> Iterator[Chunk]:
    for start, (offsets, sizes) in place.boxes(lo, hi, limit):
        n = torch.Size(sizes).numel()
        yield Chunk(key, place.global_shape, offsets, flat[start:start + n].view(sizes))


def rank_chunks(view: RankView, limit_bytes: int) -> Iterator[Chunk]:
    """Every chunk this rank writes, as views of its device state, each at most `limit_bytes`."""
    ps, opt = view.ps, view.optimizer
    names, layers = _placements(view)
    tied_copy = view.model.tie_word_embeddings
    for v, chunk in enumerate(view.chunks):
        for name, tensor in chunk.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            key = _local_name_key(names, v, name, tied_copy)
            if key is None:
                continue
            place = placement(key, tensor.shape, ps.tp, ps.tp_rank, layers)
            if _writes_weight(ps, place):
                limit = max(1, limit_bytes // tensor.element_size())
                yield from _boxes(place.key, place, tensor.detach().reshape(-1), 0, tensor.numel(), limit)
    sharded = opt.buffer.distributed
    for piece in opt.pieces:
        if piece.entry.tp_duplicate:
            continue
        key = _local_name_key(names, piece.entry.chunk, piece.entry.name, tied_copy)
        if key is None:
            continue
        place = placement(key, piece.entry.param.shape, ps.tp, ps.tp_rank, layers)
        if not sharded and not _writes_weight(ps, place):
            continue
        lo, hi = piece.lo - piece.entry.start, piece.hi - piece.entry.start
        for state in OPTIMIZER_STATE:
            yield from _boxes(optimizer_key(state, place.key), place, piece.state(state), lo, hi, limit_bytes // 4)


def stage(view: RankView, iteration: int, entries: dict[str, Any], stager: HostStager, *, keep: bool) -> StagedSave:
    """This rank's save. `keep`: copy every chunk to host memory now (async); else chunks stay lazy device views."""
    ps = view.ps
    chunks: Iterator[Chunk] | list[Chunk] = rank_chunks(view, stager.limit_bytes)
    ready = None
    if keep:
        stager.begin_kept()
        chunks = [Chunk(c.key, c.global_shape, c.offsets, stager.host(c.data, keep=True)) for c in chunks]
        ready = stager.kept_ready()
    blobs = {rng_key(ps.rank, ps.world_size): rng_bytes()}
    if ps.rank == 0:
        layers = view.model.num_layers
        blob = extra_state_blob(view.transformer_impl)
        blobs.update({extra_state_key(m, layer, layers): blob for layer in range(layers) for m in EXTRA_STATE_MODULES})
        common = {"args": entries["args"], "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                  "optimizer": {**view.optimizer.header(), "param_state_sharding_type": SHARDING_TYPE},
                  "opt_param_scheduler": entries["opt_param_scheduler"], "train_state": entries["train_state"],
                  "parallel": parallel_signature(ps)}
        blobs[COMMON_STATE_KEY] = torch_bytes([common])  # the ShardedObject `common_state`, as Megatron Core 0.19
    return StagedSave(ps.rank, chunks, blobs, ready=ready)


def parallel_signature(ps: ParallelState) -> dict[str, int]:
    """The layout that the per-rank RNG blobs belong to: restored only at the same one."""
    layout = ps.layout
    return {"world": ps.world_size, "tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp or 0, "ep": layout.ep,
            "cp": ps.cp}


def write_files(folder: Path, staged: StagedSave, stager: HostStager) -> DcpPart:
    """This rank's `.distcp` (no collective: safe in a background thread)."""
    if staged.ready is not None:
        staged.ready.synchronize()
    writer = DcpPartWriter(folder, f"__{staged.rank}_0.distcp")
    for chunk in staged.chunks:
        writer.add_chunk(chunk.key, chunk.global_shape, chunk.offsets, stager.host(chunk.data))
    for key, data in staged.blobs.items():
        writer.add_bytes(key, data)
    return writer.close()


def finish(folder: Path, part: DcpPart | BaseException, rank: int) -> None:
    """Collective: gather every rank's chunk table to rank 0, which writes `.metadata` and, last, `metadata.json`. A rank whose write failed makes every rank raise the same one-line error."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    failure = f"{type(part).__name__}: {part}" if isinstance(part, BaseException) else None
    failures: list[Any] = [failure]
    parts: list[Any] = [part]
    if world > 1:
        failures = [None] * world
        dist.all_gather_object(failures, failure)
    failed = [(r, f) for r, f in enumerate(failures) if f is not None]
    if failed:
        r, message = failed[0]
        raise BridgeError(f"checkpoint {folder.name} could not be written on rank {r}: {message.splitlines()[0]}")
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
    if rank == 0:
        write_metadata(folder, parts)
        (folder / CONFIG_FILE).write_text(json.dumps(DCP_COMMON_BACKEND_CONFIG))
