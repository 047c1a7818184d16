"""Incremental writer and lazy reader for torch's zip serialization format (what `torch.save` writes).

`torch.save` needs the whole object in memory. A Megatron rank file of a big model does not fit that
budget, so tensors are written as zip records the moment they arrive, and the pickled index
(`data.pkl`, which only references the records) is written last. `torch.load(weights_only=True)`
reads the result like any other checkpoint. Reading goes the other way: the index is loaded on the
`meta` device (which records each storage's file offset) and a tensor's bytes are read on demand.
"""
from __future__ import annotations

import collections
import io
import pickle
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from bridge.errors import BridgeError


class _StorageRef:
    """Stands for a storage already written as record `data/{key}`; pickled as torch's persistent id."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly like a contiguous CPU tensor whose storage is `storage`."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        stride = torch.empty(self.shape, device="meta").stride()
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


class _LatchingFile:
    """The file torch's zip writer writes through; a write error is kept, never raised into the C++ writer.

    An exception thrown out of torch's writer leaves its zip offsets out of step, and its destructor then
    aborts the process (SIGABRT). So the first OSError (e.g. ENOSPC) is latched, later writes are dropped,
    and `IncrementalTorchWriter` raises the latched error itself after each record.
    """

    def __init__(self, path: Path) -> None:
        self._file = path.open("wb")
        self.error: Exception | None = None

    def write(self, data: memoryview) -> int:
        self._latch(self._file.write, data)
        return memoryview(data).nbytes

    def flush(self) -> None:
        self._latch(self._file.flush)

    def _latch(self, op: Callable[..., Any], *args: Any) -> None:
        """Run `op` unless an error is latched; latch its error (ValueError: the file was closed under it)."""
        if self.error is None:
            try:
                op(*args)
            except (OSError, ValueError) as exc:
                self.error = exc

    def check(self) -> None:
        """Raise the latched write error, if any."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.flush()
        self._file.close()
        self.check()


def _storage_bytes(tensor: torch.Tensor) -> Any:
    """A contiguous CPU tensor's bytes as the Storage object `write_record` takes (its data-pointer form is
    deprecated): the tensor's own storage, or for a view into a bigger one a storage aliasing just the view's bytes."""
    storage = tensor.untyped_storage()
    if tensor.storage_offset() == 0 and storage.nbytes() == tensor.nbytes:
        return storage
    alias = getattr(torch._C, "_construct_storage_from_data_pointer", None)
    return alias(tensor.data_ptr(), tensor.device, tensor.nbytes) if alias else tensor.data_ptr()


class IncrementalTorchWriter:
    """Write `torch.save`-compatible files one tensor at a time; memory holds one tensor at most."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = _LatchingFile(path)
        self._zip = torch._C.PyTorchFileWriter(self._file)
        self._count = 0

    def tensor(self, tensor: torch.Tensor) -> _TensorRef:
        """Write the tensor's bytes now; return a placeholder to put into the object saved by `close`."""
        tensor = tensor.detach().cpu().contiguous()
        key = str(self._count)
        self._count += 1
        # A contiguous view (a TP shard of a bigger tensor) is written from its own bytes: no clone.
        data = _storage_bytes(tensor) if tensor.nbytes else b""
        self._zip.write_record(f"data/{key}", data, tensor.nbytes)
        self._file.check()
        return _TensorRef(_StorageRef(key, tensor.dtype, tensor.numel()), tuple(tensor.shape))

    def close(self, obj: Any) -> None:
        """Pickle `obj` (holding placeholders from `tensor`) as the file's index, then finish the zip."""
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        # No `.format_version` record: it would promise that records are laid out in the order the
        # index references them, which incremental writing does not guarantee; torch.load then looks
        # each record's offset up in the zip directory instead.
        for name, value in ((".storage_alignment", "64"), ("byteorder", sys.byteorder)):
            self._zip.write_record(name, value, len(value))
        self._zip.write_end_of_file()
        self._file.close()


def load_index(path: Path, safe_globals: list[Any]) -> Any:
    """The file's object with every tensor on `meta` (no data read): shapes, dtypes and file offsets."""
    try:
        with torch.serialization.safe_globals(safe_globals):
            return torch.load(path, map_location="meta", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BridgeError(f"cannot read {path}: {first}; the file is truncated, corrupt or not a torch checkpoint") from exc


def read_tensor(path: Path, meta: torch.Tensor) -> torch.Tensor:
    """Read one tensor's bytes from `path` at the offset recorded in its meta storage."""
    storage = meta.untyped_storage()
    offset = getattr(storage, "_checkpoint_offset", None)
    if offset is None:
        raise BridgeError(f"{path}: tensor has no file offset; re-save the checkpoint with torch >= 2.4")
    nbytes = storage.nbytes()
    with open(path, "rb") as handle:
        data = bytearray(nbytes)
        handle.seek(offset)
        got = handle.readinto(data)
    if got != nbytes:
        raise BridgeError(f"{path} is truncated: a tensor needs {nbytes} bytes at offset {offset}, found {got}")
    flat = torch.frombuffer(data, dtype=meta.dtype) if nbytes else torch.empty(0, dtype=meta.dtype)
    return flat.as_strided(meta.shape, meta.stride(), meta.storage_offset())


def read_into(path: Path, meta: torch.Tensor, out: torch.Tensor, first: int = 0) -> None:
    """Read `out.numel()` elements of a stored contiguous tensor, from element `first`, straight into `out`.

    Used to assemble a TP-gathered tensor in place: one copy from the file instead of read + cat.
    """
    storage = meta.untyped_storage()
    if not (meta.is_contiguous() and out.is_contiguous() and out.dtype == meta.dtype):
        raise ValueError("read_into needs contiguous tensors of the stored dtype")
    start = storage._checkpoint_offset + (meta.storage_offset() + first) * meta.element_size()
    view = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
    if view is None:
        return
    with open(path, "rb", buffering=0) as handle:
        handle.seek(start)
        got = handle.readinto(view)
    if got != out.nbytes:
        raise BridgeError(f"{path} is truncated: expected {out.nbytes} bytes at offset {start}, found {got}")
