"""HF checkpoints: a validated, lazy safetensors reader and a streaming, sharded safetensors writer."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from bridge.errors import BridgeError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: safetensors dtype codes (the format's spec) for the dtypes bridge writes.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index when there is one, else from every shard's header."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            entries = list(weight_map.items())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BridgeError(f"{index} is not a valid safetensors index (needs a 'weight_map' object): {exc}") from exc
        return {name: _indexed_shard(folder, index, name, rel) for name, rel in entries}
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        if list(folder.glob("pytorch_model*.bin")) or list(folder.glob("*.pt")):
            raise BridgeError(f"{folder} holds only pickled .bin weights; convert them to safetensors first "
                              "(transformers: model.save_pretrained(out, safe_serialization=True))")
        raise BridgeError(f"no *.safetensors weights in {folder}")
    files: dict[str, Path] = {}
    for shard in shards:
        for name in _open(shard).keys():
            if name in files:
                raise BridgeError(f"tensor {name} is in both {files[name]} and {shard}; remove the stale file "
                                  f"or add a {INDEX_NAME} that says which one holds it")
            files[name] = shard
    return files


def _indexed_shard(folder: Path, index: Path, name: str, rel: object) -> Path:
    """The file an index entry names. The check is on the name as written (a plain relative path, no `..`),
    not on where it resolves: the HF cache's snapshot files are symlinks into `../../blobs/`, which is fine."""
    if not isinstance(rel, str) or not rel:
        raise BridgeError(f"{index}: weight_map entry for {name} is {rel!r}, not a file name; re-download the model")
    if _escapes(rel):
        raise BridgeError(f"{index}: weight_map path {rel!r} for {name} points outside {folder} (absolute or with '..'); "
                          "refusing to read it: the index must name files inside the model folder")
    path = folder / rel
    if not path.is_file():
        raise BridgeError(f"{index} names shard {rel} (for {name}) but the file is missing; re-download the model")
    return path


def _escapes(rel: str) -> bool:
    """Absolute, drive-qualified or with a `..` component, read as a POSIX or a Windows path."""
    return any(p.is_absolute() or p.drive or ".." in p.parts for p in (PurePosixPath(rel), PureWindowsPath(rel)))


def _open(path: Path):  # noqa: ANN202 - safetensors' handle type is private
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise BridgeError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt, re-download it") from exc


_TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}  # safetensors' dtype names -> torch dtypes


class SafetensorsReader:
    """Lazy access to an HF folder's tensors: headers are read up front, data only on `get`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files = _weight_files(folder)
        self._handles = {path: _open(path) for path in set(self._files.values())}
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Catch truncated files now: the header's last data offset must fit in the file."""
        for path in self._handles:
            with path.open("rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            last = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + last > os.path.getsize(path):
                raise BridgeError(f"{path} is truncated ({os.path.getsize(path)} bytes, header needs {8 + header_len + last}); re-download it")

    def names(self) -> set[str]:
        return set(self._files)

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """Read one tensor, or only its `index` on dim 0 (one expert of a stacked tensor). The file is mapped only
        for this read: a handle kept open would keep every page read so far resident (file-backed RSS grows to the
        model's size)."""
        try:
            with safe_open(str(self._files[name]), framework="pt") as handle:
                return handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except KeyError:
            raise BridgeError(f"tensor {name} is not in {self.folder}") from None
        except SafetensorError as exc:
            raise BridgeError(f"cannot read {name} from {self._files[name]}: {exc}") from exc

    def meta(self, name: str) -> torch.Tensor:
        """A `meta` tensor with the stored shape and dtype, for planning without reading data."""
        sl = self._handles[self._files[name]].get_slice(name)
        dtype = _TORCH_DTYPES[sl.get_dtype()]
        return torch.empty(sl.get_shape(), dtype=dtype, device="meta")


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (transformers' convention: decimal units, and GiB/MiB binary)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    value = text.strip().upper()
    unit = next((u for u in units if value.endswith(u)), None)
    number = value[: -len(unit)] if unit else value if value.isdigit() else None
    try:
        size = float(number) * units.get(unit, 1)
    except (TypeError, ValueError):
        raise BridgeError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or 2GiB") from None
    if not math.isfinite(size) or size < 1:
        raise BridgeError(f"size {text!r} must be a positive, finite number of bytes; use e.g. 5GB, 500MB or 2GiB")
    return int(size)


def shard_files(groups: list[list[list[PlannedTensor]]]) -> dict[str, list[PlannedTensor]]:
    """File name -> tensors for shards given group by group (one group per process), numbered across all groups."""
    shards = [shard for group in groups for shard in group]
    if len(shards) == 1:
        return {SINGLE_NAME: shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards)}


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """`model.safetensors.index.json`: which shard file holds each tensor."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


class StreamingSafetensorsWriter:
    """Write a planned set of tensors into size-capped safetensors shards as they arrive, in any order.

    The safetensors library only writes whole dicts; with the plan known up front (from the source's
    headers) each shard's header is written first and every tensor's bytes go straight to its offset,
    so memory never holds more than the tensor being written.
    """

    def __init__(self, folder: Path, plan: Iterable[PlannedTensor], max_shard_size: int,
                 files: dict[str, list[PlannedTensor]] | None = None) -> None:
        """`files`: the shard files to write and what each holds, in place of splitting `plan` (one process's share
        of an export over several: the parent names every file and writes the index)."""
        self.folder = folder
        self._plan = {p.name: p for p in plan}
        self._index = files is None
        files = files if files is not None else shard_files([self.split(list(self._plan.values()), max_shard_size)])
        self._where: dict[str, tuple[Path, int]] = {}
        self._files: dict[Path, object] = {}
        for fname, shard in files.items():
            self._start_shard(folder / fname, shard)
        self._pending = set(self._plan)
        self._parts: dict[str, set[int | None]] = {}

    @staticmethod
    def split(plan: list[PlannedTensor], cap: int) -> list[list[PlannedTensor]]:
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for p in plan:
            if shards[-1] and size + p.nbytes > cap:
                shards.append([])
                size = 0
            shards[-1].append(p)
            size += p.nbytes
        return shards

    def _start_shard(self, path: Path, shard: list[PlannedTensor]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        offsets = {}
        for p in shard:
            header[p.name] = {"dtype": SAFETENSORS_DTYPES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
            offsets[p.name] = offset
            offset += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        handle = path.open("wb")
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + offset)
        base = 8 + len(raw)
        for name, off in offsets.items():
            self._where[name] = (path, base + off)
        self._files[path] = handle

    def write(self, name: str, tensor: torch.Tensor, part: int | None = None) -> None:
        """Write a planned tensor, or its index `part` on dim 0 (one expert of a stacked tensor: the tensor is done
        when every index has been written)."""
        planned = self._plan.get(name)
        done = self._parts.setdefault(name, set())
        if planned is None or name not in self._pending or part in done or (part is None and done):
            raise BridgeError(f"internal: tensor {name} was not planned or was written twice")
        shape = planned.shape if part is None else planned.shape[1:]
        outside = part is not None and part >= planned.shape[0]
        if tuple(tensor.shape) != shape or tensor.dtype != planned.dtype or outside:
            raise BridgeError(f"internal: {name}[{part}] is {tuple(tensor.shape)} {tensor.dtype}, planned "
                              f"{planned.shape} {planned.dtype}")
        path, offset = self._where[name]
        handle = self._files[path]
        flat = tensor.detach().contiguous().reshape(-1)
        handle.seek(offset + (part or 0) * flat.numel() * flat.element_size())
        if flat.numel():
            handle.write(flat.view(torch.uint8).numpy().data)
        done.add(part)
        if part is None or len(done) == planned.shape[0]:
            self._pending.discard(name)

    def close(self) -> None:
        """Finish the files and the index; every planned tensor must have been written."""
        for handle in self._files.values():
            handle.close()
        if self._pending:
            raise BridgeError(f"{len(self._pending)} HF tensors were never produced: {', '.join(sorted(self._pending)[:10])}")
        if self._index and len(self._files) > 1:
            write_index(self.folder, {name: path.name for name, (path, _) in self._where.items()},
                        sum(p.nbytes for p in self._plan.values()))
