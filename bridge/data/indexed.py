"""Megatron `MMapIndexedDataset` files: a streaming, atomic writer and a lazy np.memmap reader.

Layout (the one Megatron Core's `IndexedDataset` reads, version 1, all little-endian):

    PREFIX.idx: b"MMIDIDX\\x00\\x00"  u64 version=1  u8 dtype code
                u64 sequence_count  u64 document_count (= documents + 1)
                i32[sequence_count] sequence lengths (tokens)
                i64[sequence_count] sequence pointers (byte offsets into .bin)
                i64[document_count] document indices (0, then the end sequence of each document)
    PREFIX.bin: the tokens of all sequences back to back, in the dtype of the code.

bridge writes one sequence per document (what `tools/preprocess_data.py` writes without
`--split-sentences`), so the document indices are 0..N.

SFT loss masks live in a companion dataset `PREFIX_loss_mask.{bin,idx}` (see `loss_mask_prefix`):
an ordinary indexed dataset of uint8 0/1 with exactly the same sequence lengths as PREFIX. Keeping
it a separate, standard dataset means Megatron's reader opens both files unchanged and the token
file stays byte-compatible with pretraining data; a reader pairs them by name.
"""
from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from bridge.errors import BridgeError, disk_space_checked

logger = logging.getLogger(__name__)

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
#: Megatron's DType enum: numpy dtype <-> one-byte code in the .idx header.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}
_HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # 34 bytes
#: Suffix of the SFT loss-mask companion dataset: `PREFIX` -> `PREFIX_loss_mask`.
LOSS_MASK_SUFFIX = "_loss_mask"
_SPOOL_ITEMS = 1 << 20  # lengths buffered in memory before they go to the spool file
_CHUNK_ITEMS = 1 << 22  # lengths handled at once while writing the index
_SCAN_ITEMS = 1 << 24  # tokens compared at once by `token_range` (32 MiB of uint16)
#: What to do when the disk fills up while a dataset is written (its temporary files are removed).
_NO_SPACE_ADVICE = "free space there or write the dataset to another disk (the partial files were removed)"


def token_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron picks for a vocabulary (`DType.optimal_dtype`): uint16 below 65500."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def loss_mask_prefix(prefix: str | os.PathLike) -> str:
    """The path prefix of the loss-mask companion of the dataset at `prefix`."""
    return f"{os.fspath(prefix)}{LOSS_MASK_SUFFIX}"


def strip_suffix(path: str | os.PathLike) -> str:
    """Accept `PREFIX`, `PREFIX.bin` or `PREFIX.idx` and return `PREFIX`."""
    text = os.fspath(path)
    return text[:-4] if text.endswith((".bin", ".idx")) else text


class IndexedDatasetWriter:
    """Append documents to `PREFIX.bin.tmp`; `finalize` writes the index, `commit` renames both.

    Tokens go straight to disk and per-document lengths are spooled to a temporary file, so memory
    does not grow with the corpus. Nothing appears under the final names until `commit`; `abort`
    (also run when the `with` block raises, KeyboardInterrupt included) removes every temporary.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise BridgeError(f"dtype {self.dtype} has no Megatron code; use one of {sorted(map(str, _CODE_OF))}")
        self.bin_path, self.idx_path = f"{self.prefix}.bin", f"{self.prefix}.idx"
        self._bin_tmp, self._idx_tmp = self.bin_path + ".tmp", self.idx_path + ".tmp"
        self._spool_tmp = self.idx_path + ".lengths.tmp"
        Path(self.bin_path).parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._bin_tmp, "wb")
        self._spool = open(self._spool_tmp, "wb")
        self._pending: list[np.ndarray] = []
        self._pending_items = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._finalized = False

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document as one sequence; `tokens` is converted to the dataset dtype."""
        array = np.ascontiguousarray(tokens, dtype=self.dtype)
        with disk_space_checked(self.bin_path, _NO_SPACE_ADVICE):
            self._bin.write(array.tobytes())
        self.add_lengths(np.array([array.size], dtype=np.int32))

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: `flat` is their tokens back to back, `lengths` their sizes."""
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) != flat.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {flat.size} tokens were given")
        with disk_space_checked(self.bin_path, _NO_SPACE_ADVICE):
            self._bin.write(np.ascontiguousarray(flat, dtype=self.dtype).tobytes())
        self.add_lengths(lengths)

    def add_lengths(self, lengths: np.ndarray) -> None:
        """Record sequence lengths whose tokens were already written (internal helper, public for tests)."""
        self._pending.append(lengths)
        self._pending_items += lengths.size
        self.num_documents += lengths.size
        self.num_tokens += int(lengths.sum(dtype=np.int64))
        if self._pending_items >= _SPOOL_ITEMS:
            self._flush_lengths()

    def _flush_lengths(self) -> None:
        if self._pending:
            with disk_space_checked(self.idx_path, _NO_SPACE_ADVICE):
                self._spool.write(np.concatenate(self._pending).astype(np.int32).tobytes())
        self._pending, self._pending_items = [], 0

    def finalize(self) -> None:
        """Close the data file and write the index next to it (still under temporary names)."""
        self._flush_lengths()
        with disk_space_checked(self.bin_path, _NO_SPACE_ADVICE):
            self._bin.close()  # writes out what is still buffered
        with disk_space_checked(self.idx_path, _NO_SPACE_ADVICE):
            self._spool.close()
            self._write_index()
        os.remove(self._spool_tmp)
        self._finalized = True

    def _write_index(self) -> None:
        count = self.num_documents
        with open(self._idx_tmp, "wb") as idx:
            idx.write(INDEX_MAGIC)
            idx.write(struct.pack("<Q", INDEX_VERSION))
            idx.write(struct.pack("<B", _CODE_OF[self.dtype]))
            idx.write(struct.pack("<Q", count))
            idx.write(struct.pack("<Q", count + 1))
            for chunk in self._spooled_lengths():
                idx.write(chunk.tobytes())
            offset = 0
            for chunk in self._spooled_lengths():
                bytes_ = chunk.astype(np.int64) * self.dtype.itemsize
                idx.write((np.cumsum(bytes_) - bytes_ + offset).tobytes())
                offset += int(bytes_.sum())
            for start in range(0, count + 1, _CHUNK_ITEMS):
                idx.write(np.arange(start, min(start + _CHUNK_ITEMS, count + 1), dtype=np.int64).tobytes())

    def _spooled_lengths(self) -> Iterator[np.ndarray]:
        with open(self._spool_tmp, "rb") as spool:
            while chunk := spool.read(_CHUNK_ITEMS * 4):
                yield np.frombuffer(chunk, dtype=np.int32)

    def commit(self) -> None:
        """Move the finished files to their final names (index last, so readers never see a new
        index over an old data file)."""
        if not self._finalized:
            raise RuntimeError("finalize() before commit()")
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        """Close and remove every temporary file; the final names are left as they were."""
        for handle in (self._bin, self._spool):
            handle.close()
        for path in (self._bin_tmp, self._idx_tmp, self._spool_tmp):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        if not self._finalized:
            self.finalize()
        self.commit()


class IndexedDataset:
    """Lazy reader of a Megatron indexed dataset: the index and the tokens are np.memmap views.

    `ds[i]` is sequence i (a read-only view, no copy); `ds.document(d)` joins the sequences of
    document d. Opening costs O(1) memory whatever the corpus size.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = strip_suffix(prefix)
        idx_path, bin_path = f"{self.prefix}.idx", f"{self.prefix}.bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise BridgeError(f"{path} does not exist; give the prefix that `bridge data prepare` printed")
        self.dtype, sequences, documents = _read_header(idx_path)
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        expected = _HEADER_SIZE + 12 * sequences + 8 * documents
        if index.size < expected:
            raise BridgeError(f"{idx_path} is truncated ({index.size} bytes, expected {expected}); prepare it again")
        offset = _HEADER_SIZE
        self.sequence_lengths = np.frombuffer(index, dtype=np.int32, count=sequences, offset=offset)
        offset += 4 * sequences
        self.sequence_pointers = np.frombuffer(index, dtype=np.int64, count=sequences, offset=offset)
        offset += 8 * sequences
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=documents, offset=offset)
        self._index = index
        size = os.path.getsize(bin_path)
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if sequences else 0
        if size < end or size % self.dtype.itemsize:
            raise BridgeError(f"{bin_path} is truncated ({size} bytes, index needs {end}); prepare it again")
        self._bin = np.memmap(bin_path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return int(self.sequence_lengths.size)

    @property
    def num_documents(self) -> int:
        return max(int(self.document_indices.size) - 1, 0)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset:offset+length` of sequence `index` (Megatron's `IndexedDataset.get`)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences")
        size = int(self.sequence_lengths[index])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}:{offset + length} out of range for sequence {index} of {size} tokens")
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize + offset
        return self._bin[start : start + length]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document `doc` (its sequences joined; one sequence for bridge's files)."""
        first, last = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if last - first == 1:
            return self.get(first)
        return np.concatenate([self.get(i) for i in range(first, last)]) if last > first else self._bin[:0]

    def documents(self) -> Iterator[np.ndarray]:
        for doc in range(self.num_documents):
            yield self.document(doc)

    def token_range(self) -> tuple[int, int] | None:
        """(smallest, largest) token id of the data file (None when it has no tokens). Read in chunks of the
        memory map, so a corpus of any size streams through at disk speed in bounded memory."""
        end = int(self.sequence_pointers[-1]) // self.dtype.itemsize + int(self.sequence_lengths[-1]) if len(self) else 0
        if end == 0:
            return None
        low, high = None, None
        for start in range(0, end, _SCAN_ITEMS):
            chunk = self._bin[start:min(start + _SCAN_ITEMS, end)]
            low = int(chunk.min()) if low is None else min(low, int(chunk.min()))
            high = int(chunk.max()) if high is None else max(high, int(chunk.max()))
        return low, high


def _read_header(idx_path: str) -> tuple[np.dtype, int, int]:
    with open(idx_path, "rb") as stream:
        head = stream.read(_HEADER_SIZE)
    if len(head) < _HEADER_SIZE or head[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise BridgeError(f"{idx_path} is not a Megatron indexed dataset index (bad magic header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[len(INDEX_MAGIC) :])
    if version != INDEX_VERSION:
        raise BridgeError(f"{idx_path} has index version {version}; only version {INDEX_VERSION} is supported")
    if code not in DTYPE_CODES:
        raise BridgeError(f"{idx_path} has unknown dtype code {code}; expected one of {sorted(DTYPE_CODES)}")
    return DTYPE_CODES[code], sequences, documents


class SFTDataset:
    """Tokens plus their loss mask (1 = train on this token), paired by `loss_mask_prefix`."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.tokens = IndexedDataset(prefix)
        mask_prefix = loss_mask_prefix(self.tokens.prefix)
        if not os.path.isfile(f"{mask_prefix}.idx"):
            raise BridgeError(f"{mask_prefix}.idx does not exist; prepare the data with `bridge data prepare --chat`")
        self.loss_mask = IndexedDataset(mask_prefix)
        if not np.array_equal(self.tokens.sequence_lengths, self.loss_mask.sequence_lengths):
            raise BridgeError(f"{mask_prefix} does not match {self.tokens.prefix} (sequence lengths differ); prepare again")

    def __len__(self) -> int:
        return len(self.tokens)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens.get(index, offset, length), self.loss_mask.get(index, offset, length)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.get(index)


def has_loss_mask(prefix: str | os.PathLike) -> bool:
    """Whether the dataset at `prefix` has an SFT loss-mask companion."""
    mask = loss_mask_prefix(strip_suffix(prefix))
    return os.path.isfile(f"{mask}.idx") and os.path.isfile(f"{mask}.bin")
