"""A DCP checkpoint written by many ranks at once: one `.distcp` file per rank, one `.metadata` for all.

Each rank appends its chunks to `__{rank}_0.distcp` with `DcpPartWriter` (no collective while writing) and
keeps the chunk table of its file, a few hundred bytes per chunk. Rank 0 gathers those tables
(`dist.gather_object`) and `write_metadata` merges them into the global `.metadata`, after checking that
every tensor's chunks, from all ranks together, cover it exactly once. That is what `dcp.save` does with
its planner, without handing DCP the whole state dict at once.
"""
from __future__ import annotations

import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorStorageMetadata)

from bridge.converters.dcp import DCP_VERSION, METADATA_FILE, DcpWriter
from bridge.errors import BridgeError


@dataclass
class DcpPart:
    """One rank file's share of `.metadata`."""

    tensors: dict[str, TensorStorageMetadata]
    blobs: dict[str, BytesStorageMetadata]
    storage: dict[MetadataIndex, _StorageInfo]


class DcpPartWriter(DcpWriter):
    """DcpWriter for one rank's file: `close` returns its part of the metadata instead of writing `.metadata`."""

    def close(self) -> DcpPart:  # type: ignore[override]
        self._stream.flush()
        self._stream.close()
        return DcpPart(self._tensors, self._bytes, self._storage)


def write_metadata(folder: Path, parts: list[DcpPart], expected: set[str] | None = None) -> None:
    """Merge every rank's part into `.metadata`; a tensor not covered exactly once by the chunks is an error, and so
    is a key missing from or added to `expected` (when given: a part that never arrived leaves no other trace)."""
    tensors: dict[str, TensorStorageMetadata] = {}
    blobs: dict[str, BytesStorageMetadata] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    for part in parts:
        for key, entry in part.tensors.items():
            merged = tensors.setdefault(key, TensorStorageMetadata(entry.properties, entry.size, []))
            if merged.size != entry.size or merged.properties.dtype != entry.properties.dtype:
                raise BridgeError(f"{key}: ranks disagree on its global shape or dtype ({tuple(merged.size)} "
                                  f"{merged.properties.dtype} vs {tuple(entry.size)} {entry.properties.dtype})")
            merged.chunks.extend(entry.chunks)
        for key, blob in part.blobs.items():
            if key in blobs:
                raise BridgeError(f"{key} was written by two ranks")
            blobs[key] = blob
        storage.update(part.storage)
    if expected is not None:
        _check_keys(expected, set(tensors) | set(blobs))
    for key, entry in tensors.items():
        covered = sum(torch.Size(c.sizes).numel() for c in entry.chunks)
        if covered != entry.size.numel():
            raise BridgeError(f"{key}: the ranks' chunks cover {covered} of {entry.size.numel()} elements")
    metadata = Metadata(state_dict_metadata={**tensors, **blobs}, planner_data=None, storage_data=storage,
                        version=DCP_VERSION, storage_meta=StorageMeta(checkpoint_id=None, save_id=str(uuid.uuid4()),
                                                                      load_id=None))
    with open(folder / METADATA_FILE, "wb") as handle:
        pickle.dump(metadata, handle)


def _check_keys(expected: set[str], written: set[str]) -> None:
    missing, unexpected = sorted(expected - written), sorted(written - expected)
    if missing or unexpected:
        parts = [f"missing {len(missing)}: {', '.join(missing[:8])}" if missing else "",
                 f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}" if unexpected else ""]
        raise BridgeError("the parts of the checkpoint do not hold every entry once: " + "; ".join(p for p in parts if p))
