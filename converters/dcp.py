"""torch.distributed.checkpoint (DCP) files without a process group: chunk-wise writer, region reader.

`dcp.save` wants the whole state dict at once; a stacked `[L, ...]` tensor of a big model does not fit
bridge's memory budget. DCP's on-disk format is simple, so it is written directly: every chunk of a
global tensor is one `torch.save`d tensor appended to a `.distcp` file, and `.metadata` (a pickled
`torch.distributed.checkpoint.metadata.Metadata`, written last) lists each tensor's global shape,
its chunks (`ChunkStorageMetadata`: offsets, sizes) and where each chunk's bytes are
(`_StorageInfo`: file, offset, length). `FileSystemReader` and Megatron Core read the result like any
DCP checkpoint. Reading goes the other way: `.metadata` gives the chunks overlapping a requested region,
and only those chunks' bytes are read.
"""
from __future__ import annotations

import collections
import io
import pickle
import uuid
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any, Sequence

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.metadata import (_MEM_FORMAT_ENCODING, BytesStorageMetadata, ChunkStorageMetadata,
                                                   Metadata, MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import BytesIOWriteData, SavePlan, TensorWriteData, WriteItem, WriteItemType

from bridge.converters.torch_zip import read_into
from bridge.errors import BridgeError

METADATA_FILE = ".metadata"
DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION


class DcpWriter:
    """Append chunks of global tensors (and byte blobs) to one `.distcp` file; `.metadata` on close."""

    def __init__(self, folder: Path, file_name: str = "__0_0.distcp") -> None:
        self.folder, self.file_name = folder, file_name
        self._stream: IO[bytes] = open(folder / file_name, "wb")
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._bytes: dict[str, BytesStorageMetadata] = {}
        self._storage: dict[MetadataIndex, _StorageInfo] = {}

    def add_chunk(self, key: str, global_shape: Sequence[int], offsets: Sequence[int], tensor: torch.Tensor) -> None:
        """Write `tensor` as the chunk of global tensor `key` that starts at `offsets`."""
        if len(offsets) != len(global_shape) or tensor.dim() != len(global_shape):
            raise ValueError(f"{key}: chunk of rank {tensor.dim()} at {tuple(offsets)} for a global shape {tuple(global_shape)}")
        if any(o + s > g for o, s, g in zip(offsets, tensor.shape, global_shape)):
            raise ValueError(f"{key}: chunk {tuple(tensor.shape)} at {tuple(offsets)} exceeds global shape {tuple(global_shape)}")
        entry = self._tensors.setdefault(key, TensorStorageMetadata(
            properties=TensorProperties(dtype=tensor.dtype), size=torch.Size(global_shape), chunks=[]))
        if entry.size != torch.Size(global_shape) or entry.properties.dtype != tensor.dtype:
            raise ValueError(f"{key}: chunk {tensor.dtype} for {tuple(global_shape)} but earlier chunks were "
                             f"{entry.properties.dtype} for {tuple(entry.size)}")
        entry.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(tensor.shape)))
        tensor = tensor.detach().cpu().contiguous()
        if tensor.storage_offset() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # torch.save writes the whole storage of a view
        self._storage[MetadataIndex(key, torch.Size(offsets))] = self._append(lambda s: torch.save(tensor, s))

    def add_bytes(self, key: str, data: bytes) -> None:
        """A byte blob (what DCP stores for `io.BytesIO` values; Megatron's ShardedObjects)."""
        if key in self._bytes:
            raise ValueError(f"{key} written twice")
        self._bytes[key] = BytesStorageMetadata()
        self._storage[MetadataIndex(key)] = self._append(lambda s: s.write(data))

    def _append(self, write: Any) -> _StorageInfo:
        offset = self._stream.tell()
        write(self._stream)
        return _StorageInfo(relative_path=self.file_name, offset=offset, length=self._stream.tell() - offset)

    def close(self) -> None:
        """Check every tensor is covered exactly by its chunks, then write `.metadata`."""
        self._stream.close()
        for key, entry in self._tensors.items():
            covered = sum(torch.Size(c.sizes).numel() for c in entry.chunks)
            if covered != entry.size.numel():
                raise ValueError(f"{key}: chunks cover {covered} of {entry.size.numel()} elements")
        metadata = Metadata(state_dict_metadata={**self._tensors, **self._bytes}, planner_data=None,
                            storage_data=self._storage, version=DCP_VERSION,
                            storage_meta=StorageMeta(checkpoint_id=None, save_id=str(uuid.uuid4()), load_id=None))
        with open(self.folder / METADATA_FILE, "wb") as handle:
            pickle.dump(metadata, handle)


_DCP_CLASSES: tuple[type, ...] = (
    Metadata, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata, TensorProperties, _MEM_FORMAT_ENCODING,
    MetadataIndex, StorageMeta, _StorageInfo, _StoragePrefix,
    SavePlan, WriteItem, WriteItemType, TensorWriteData, BytesIOWriteData,  # Megatron Core keeps its save plans
)
_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


class _PathFromParts:
    """What a pickled `PosixPath` (`StorageMeta.checkpoint_id`) loads as: a pure path. An instance with no
    attributes, so that pickle's BUILD can set none on it."""

    __slots__ = ()

    def __call__(self, *parts: str) -> PurePosixPath:
        return PurePosixPath(*parts)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Every global a DCP `.metadata` may name, as exact (module, name) pairs, and what each one loads as.

    Found by recording what `dcp.save` and Megatron Core's `dist_checkpointing.save` write: DCP's dataclasses,
    torch.Size, dtype constants (`torch.<name>`), layouts (`torch.serialization._get_layout('torch.strided')`),
    OrderedDict and `StorageMeta.checkpoint_id`'s path (`pathlib._local` from Python 3.13). pickle's BUILD sets
    attributes on whatever a global gives, and these objects are shared by the whole process (torch's layout
    cache and pathlib's `__fspath__` together would redirect a later open()). So each entry either refuses new
    attributes (builtin types and constants, a dict's `__getitem__` for layouts, a slotted `_PathFromParts`) or
    is a DCP class, which `_unpickle` guards.
    """
    table: dict[tuple[str, str], Any] = {(cls.__module__, cls.__qualname__): cls for cls in _DCP_CLASSES}
    table.update({("torch", name): value for name, value in vars(torch).items()
                  if isinstance(value, (torch.dtype, torch.layout, torch.memory_format))})
    table.update({("torch", "Size"): torch.Size, ("torch.serialization", "_get_layout"): _LAYOUTS.__getitem__,
                  ("collections", "OrderedDict"): collections.OrderedDict, ("builtins", "set"): set,
                  ("builtins", "frozenset"): frozenset, ("pathlib", "PosixPath"): _PathFromParts(),
                  ("pathlib._local", "PosixPath"): _PathFromParts()})
    return table


class _SafeUnpickler(pickle.Unpickler):
    """`.metadata` is a pickle from a user's folder: it gets the objects of a fixed table, nothing imported or walked.

    A prefix rule ("anything under torch.distributed.checkpoint") is not enough: protocol 4 resolves a dotted name
    attribute by attribute, and that package's modules import `os` and `torch`, so `filesystem` + `os.system` is
    a call to os.system. Hence exact pairs, looked up in the table, and no `super().find_class`.
    """

    ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _unpickle(handle: IO[bytes]) -> Any:
    """Load with `_SafeUnpickler`, refusing (and undoing) any attribute the pickle set on a DCP class.

    BUILD with a slot state is `setattr(obj, name, value)`, on a class too; a changed class would outlive the
    load and change how every later DCP object behaves in this process.
    """
    before = {cls: dict(vars(cls)) for cls in _DCP_CLASSES}
    try:
        return _SafeUnpickler(handle).load()
    finally:
        changed = [cls for cls, attrs in before.items() if _restore(cls, attrs)]
        if changed:
            raise pickle.UnpicklingError(f"refusing a pickle that sets attributes of {changed[0].__qualname__}")


def _restore(cls: type, attrs: dict[str, Any]) -> bool:
    """Put back `cls`'s attributes as `attrs` holds them; True when any had changed."""
    now = dict(vars(cls))
    changed = now.keys() != attrs.keys() or any(now[k] is not v for k, v in attrs.items())
    for name in now.keys() - attrs.keys():
        delattr(cls, name)
    for name, value in attrs.items():
        if now.get(name) is not value:
            setattr(cls, name, value)
    return changed


class _FileView(io.RawIOBase):
    """A read-only window [offset, offset + length) of an open file: one chunk's `torch.save` zip."""

    def __init__(self, handle: IO[bytes], offset: int, length: int) -> None:
        super().__init__()
        self.handle, self.offset, self.length, self.pos = handle, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def readinto(self, buffer: Any) -> int:
        size = max(0, min(len(buffer), self.length - self.pos))
        self.handle.seek(self.offset + self.pos)
        got = self.handle.readinto(memoryview(buffer)[:size])
        self.pos += got
        return got


def _load_metadata(path: Path) -> Metadata:
    """Unpickle `.metadata` through the fixed table of `_SafeUnpickler` and check it has the shape of DCP metadata."""
    if not path.is_file():
        raise BridgeError(f"{path.parent} has no {METADATA_FILE}; the torch_dist checkpoint is incomplete (interrupted save?)")
    try:
        with open(path, "rb") as handle:
            metadata = _unpickle(handle)
    except (pickle.UnpicklingError, EOFError, AttributeError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise BridgeError(f"cannot read {path}: {exc}; the file is corrupt or not DCP metadata") from exc
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict) \
            or not isinstance(metadata.state_dict_metadata, dict):
        raise BridgeError(f"{path} is not torch.distributed.checkpoint metadata")
    return metadata


def _check_location(folder: Path, index: Any, info: Any) -> None:
    """A storage entry must name a byte range of a file inside `folder`: `.metadata` comes from the user's folder,
    and a path like `../../x.distcp` or `/abs/x.distcp` would make a reader read whatever it points at."""
    where = f"{folder / METADATA_FILE}: the chunk of {getattr(index, 'fqn', index)}"
    if not isinstance(info, _StorageInfo):
        raise BridgeError(f"{where} has storage {type(info).__name__}, not DCP's _StorageInfo; the file is corrupt")
    if getattr(info, "transform_descriptors", None):
        raise BridgeError(f"{folder}: chunks stored with transforms {info.transform_descriptors} are not supported")
    rel = info.relative_path
    if not isinstance(rel, str) or not _inside(rel):
        raise BridgeError(f"{where} is stored at {rel!r}, not a file inside the checkpoint folder; refusing to read it "
                          "(the .metadata is corrupt or crafted: save or copy the checkpoint again)")
    for field in ("offset", "length"):
        value = getattr(info, field)
        if type(value) is not int or value < 0:
            raise BridgeError(f"{where} has {field} {value!r}, not a non-negative integer; the .metadata is corrupt "
                              "(save or copy the checkpoint again)")


def _inside(relative_path: str) -> bool:
    """A non-empty relative path with no `..`, no root, no drive and no backslash (a separator on Windows)."""
    path = PurePosixPath(relative_path)
    return bool(relative_path) and "\\" not in relative_path and "\0" not in relative_path \
        and not path.is_absolute() and ".." not in path.parts and not PureWindowsPath(relative_path).drive


class DcpReader:
    """Lazy DCP reader: `.metadata` on open; a region of a global tensor reads only the chunks it overlaps."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.metadata = _load_metadata(folder / METADATA_FILE)
        needed: dict[str, int] = {}
        for index, info in self.metadata.storage_data.items():
            _check_location(folder, index, info)
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, size in needed.items():  # a partial copy shows here, before any conversion starts
            path = folder / name
            if not path.is_file():
                raise BridgeError(f"{path} is missing; the torch_dist checkpoint is incomplete (copy the whole folder)")
            if path.stat().st_size < size:
                raise BridgeError(f"{path} is truncated ({path.stat().st_size} bytes, .metadata needs {size}); "
                                  "copy or save the checkpoint again")

    def tensor_keys(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]

    def tensor_meta(self, key: str) -> TensorStorageMetadata:
        entry = self.metadata.state_dict_metadata.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            raise BridgeError(f"{self.folder} holds no tensor {key}")
        return entry

    def has_bytes(self, key: str) -> bool:
        return isinstance(self.metadata.state_dict_metadata.get(key), BytesStorageMetadata)

    def read_bytes(self, key: str) -> bytes:
        """A byte blob (DCP's `io.BytesIO` values: Megatron Core's ShardedObjects, its common state)."""
        info = self.metadata.storage_data.get(MetadataIndex(key)) if self.has_bytes(key) else None
        if info is None:
            raise BridgeError(f"{self.folder} holds no byte entry {key}")
        with open(self.folder / info.relative_path, "rb") as handle:
            handle.seek(info.offset)
            return handle.read(info.length)

    def read(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of global tensor `key`, assembled from the chunks it overlaps."""
        entry = self.tensor_meta(key)
        if len(offsets) != len(entry.size) or any(o < 0 or o + s > g for o, s, g in zip(offsets, sizes, entry.size)):
            raise BridgeError(f"{self.folder}: region {tuple(offsets)}+{tuple(sizes)} is outside {key} {tuple(entry.size)}")
        out = torch.empty(tuple(sizes), dtype=entry.properties.dtype)
        filled = 0
        for chunk in entry.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [min(o + s, c + n) for o, s, c, n in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            target = out
            for dim, (low, h) in enumerate(zip(lo, hi)):
                target = target.narrow(dim, low - offsets[dim], h - low)
            if list(chunk.offsets) == lo and list(chunk.sizes) == [h - low for low, h in zip(lo, hi)] and target.is_contiguous():
                self._read_chunk(key, chunk, into=target)  # the chunk is exactly the target: no extra copy
            else:
                source = self._read_chunk(key, chunk)
                for dim, (low, h) in enumerate(zip(lo, hi)):
                    source = source.narrow(dim, low - chunk.offsets[dim], h - low)
                target.copy_(source)
            filled += target.numel()
        if filled != out.numel():
            raise BridgeError(f"{self.folder}: the chunks of {key} cover {filled} of the {out.numel()} elements asked for")
        return out

    def _read_chunk(self, key: str, chunk: ChunkStorageMetadata, into: torch.Tensor | None = None) -> torch.Tensor:
        info = self.metadata.storage_data.get(MetadataIndex(key, torch.Size(chunk.offsets)))
        if info is None:
            raise BridgeError(f"{self.folder}/.metadata lists a chunk of {key} at {tuple(chunk.offsets)} with no storage entry")
        path = self.folder / info.relative_path
        meta = self._load_chunk(path, info, key, chunk, "meta")
        if tuple(meta.shape) != tuple(chunk.sizes) or meta.dtype != self.tensor_meta(key).properties.dtype:
            raise BridgeError(f"{path}: chunk of {key} is {meta.dtype} {tuple(meta.shape)}, .metadata says {tuple(chunk.sizes)}")
        if not meta.is_contiguous():  # rare (a strided tensor saved as is): load it whole
            data = self._load_chunk(path, info, key, chunk, "cpu")
            return into.copy_(data) if into is not None else data
        out = into if into is not None else torch.empty(tuple(meta.shape), dtype=meta.dtype)
        if meta.numel():
            meta.untyped_storage()._checkpoint_offset += info.offset  # offsets in the view are chunk-relative
            read_into(path, meta, out)
        return out

    @staticmethod
    def _load_chunk(path: Path, info: _StorageInfo, key: str, chunk: ChunkStorageMetadata, device: str) -> torch.Tensor:
        """torch.load of one chunk's zip: on `meta` it reads only the index (shape, dtype, data offset)."""
        with open(path, "rb") as handle:
            try:
                return torch.load(_FileView(handle, info.offset, info.length), map_location=device, weights_only=True)
            except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
                first = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__
                raise BridgeError(f"cannot read chunk {tuple(chunk.offsets)} of {key} from {path}: {first}; "
                                  "the file is truncated or corrupt") from exc
