"""Resume a training checkpoint: refill the optimizer from whichever form it was saved in.

- legacy, whole tensors per weight name in `model_optim_rng.pt` (`params`) or, saved with the distributed
  optimizer, in `distrib_optim.pt` beside it (`params_file`, memory-mapped): any DP size, the same TP/PP;
- torch_dist (the common state holds `train_state`): every piece of this rank's state is read back as the
  global boxes it covers, so the checkpoint resumes at any TP/PP/DP/EP. The per-rank RNG blobs are
  restored only at the layout that saved them; elsewhere the run's seed is used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bridge.converters.dcp import DcpReader
from bridge.converters.megatron_legacy import SAFE_GLOBALS, iteration_dir_name
from bridge.converters.torch_dist import read_common_state
from bridge.parallel.state import ParallelState
from bridge.training.dist_save import optimizer_key, parallel_signature, rng_key
from bridge.training.optimizer import MixedPrecisionAdamW, Piece
from bridge.training.placement import placement, rank_names
from bridge.training.rng import rng_from_bytes
from bridge.training.staging import STAGING_BYTES

TIED_HEAD = "output_layer.weight"


def dist_training_entries(folder: Path, ps: ParallelState) -> dict[str, Any]:
    """`optimizer`, `train_state`, `opt_param_scheduler`, `rng_state` of a torch_dist training checkpoint; {} for an
    import (no training state). `optimizer` carries the folder its pieces are read from."""
    common = read_common_state(folder, DcpReader(folder))  # Megatron Core 0.19's DCP entry, or an older common.pt
    if "train_state" not in common:
        return {}
    rng = None
    if common.get("parallel") == parallel_signature(ps):
        rng = rng_from_bytes(_read_blob(DcpReader(folder), rng_key(ps.rank, ps.world_size)))
    return {"optimizer": {**common["optimizer"], "dcp_folder": str(folder)}, "train_state": common["train_state"],
            "opt_param_scheduler": common["opt_param_scheduler"], "rng_state": rng}


def _read_blob(reader: DcpReader, key: str) -> bytes:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    info = reader.metadata.storage_data[MetadataIndex(key)]
    with open(reader.folder / info.relative_path, "rb") as handle:
        handle.seek(info.offset)
        return handle.read(info.length)


def restore_optimizer(optimizer: MixedPrecisionAdamW, entry: dict[str, Any], load: Path, iteration: int,
                      ps: ParallelState, model: Any, transformer_impl: str) -> None:
    """Refill `optimizer` from a checkpoint's `optimizer` entry (any of the three forms)."""
    if "params" in entry:
        optimizer.load_state_dict(entry)
    elif "params_file" in entry:
        path = load / iteration_dir_name(iteration) / ps.layout.rank_dir(ps.tp_rank, ps.pp_rank, ps.ep_rank) / entry["params_file"]
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        optimizer.load_state_dict({**entry, **saved})
    else:
        _restore_from_dcp(optimizer, entry, ps, model, transformer_impl)


def _restore_from_dcp(optimizer: MixedPrecisionAdamW, entry: dict[str, Any], ps: ParallelState, model: Any,
                      transformer_impl: str) -> None:
    reader = DcpReader(Path(entry["dcp_folder"]))
    names = rank_names(model, ps.layout, transformer_impl, ps.pp_rank, ps.ep_rank)

    def fill(piece: Piece, state: str, out: torch.Tensor) -> None:
        name = piece.entry.name
        key = names.get((piece.entry.chunk, name)) or (TIED_HEAD == name and "embedding.word_embeddings.weight")
        place = placement(key, piece.entry.param.shape, ps.tp, ps.tp_rank, model.num_layers)
        dkey = optimizer_key(state, place.key)
        saved = reader.tensor_meta(dkey).size
        lo = piece.lo - piece.entry.start
        for start, (offsets, sizes) in place.boxes(lo, piece.hi - piece.entry.start, STAGING_BYTES // 4):
            target = out[start:start + torch.Size(sizes).numel()].view(sizes)
            inside = [max(0, min(o + s, g) - o) for o, s, g in zip(offsets, sizes, saved)]
            if inside != list(sizes):  # vocabulary rows padded for another TP: beyond the saved rows, zero
                target.zero_()
            if all(inside):
                region = target
                for dim, n in enumerate(inside):
                    region = region.narrow(dim, 0, n)
                region.copy_(reader.read(dkey, offsets, inside))

    optimizer.restore(fill, entry["step"])
