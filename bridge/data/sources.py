"""Streaming record readers for jsonl (plain, .gz, .zst) and parquet, in chunks that name file and line.

The reader stays cheap on purpose: jsonl lines travel to the tokenizer workers unparsed (the workers
run `json.loads`, as Megatron's `preprocess_data.py` does), so the main process only splits lines.
Parquet batches are read column-wise with pyarrow and only the requested columns leave the file.
Memory is bounded by one chunk, not by the corpus.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence, TextIO

from bridge.errors import BridgeError

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


@dataclass
class Chunk:
    """Consecutive records of one file: `items[i]` is (line or row number, raw JSON line or dict)."""

    source: str
    items: list[tuple[int, str | dict[str, Any]]]
    #: "line" for jsonl, "row" for parquet: how a location is spelled in messages.
    unit: str = "line"

    def where(self, number: int) -> str:
        return f"{self.source}:{number}" if self.unit == "line" else f"{self.source}:row {number}"


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Expand globs (for quoted patterns) and check every input exists and has a known format."""
    paths: list[str] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise BridgeError(f"no file matches {item}; check the pattern")
        paths.extend(matches)
    if not paths:
        raise BridgeError("no input files; give jsonl or parquet files (positional or --input)")
    for path in paths:
        if not os.path.isfile(path):
            raise BridgeError(f"input {path} does not exist or is not a file")
        input_format(path)
    return paths


def input_format(path: str) -> tuple[str, str | None]:
    """("jsonl" | "parquet", compression or None) from the file name."""
    name = Path(path).name.lower()
    compression = None
    for suffix, kind in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = kind, name[: -len(suffix)]
    if name.endswith(".parquet") and compression is None:
        return "parquet", None
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    raise BridgeError(
        f"{path}: unknown input format; expected .jsonl/.json (optionally .gz or .zst) or .parquet"
    )


def open_text(path: str, compression: str | None) -> TextIO:
    """Open a possibly compressed text file for streaming, line by line."""
    return io.TextIOWrapper(open_binary(path, compression), encoding="utf-8")


def open_binary(path: str, compression: str | None) -> BinaryIO:
    """Open a possibly compressed file as its decompressed bytes."""
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        try:
            import zstandard
        except ImportError as exc:
            raise BridgeError(f"{path} is zstd-compressed; pip install zstandard (or bridge[data])") from exc
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def not_utf8_error(path: str, compression: str | None = None) -> BridgeError:
    """The error for a text file that is not UTF-8, naming its first bad line and byte. The text reader decodes
    blocks, not lines, so its exception cannot say where: the file is read again, line by line, only then."""
    offset = 0
    with open_binary(path, compression) as stream:
        for number, line in enumerate(stream, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                where = f"byte {offset + exc.start}" + (" of the decompressed text" if compression else "")
                return BridgeError(f"{path}:{number}: not UTF-8 ({where}: {line[exc.start:exc.start + 4]!r}); "
                                   "convert the file to UTF-8, e.g. with iconv -f <its encoding> -t utf-8")
            offset += len(line)
    return BridgeError(f"{path}: not UTF-8 at its end (a character cut short); convert the file to UTF-8")


#: A chunk also ends at this many bytes of raw text: chunks of similar cost keep the workers evenly
#: busy to the end (a few huge chunks would leave one worker finishing alone).
CHUNK_BYTES = 128 * 1024


def iter_chunks(paths: Iterable[str], keys: Sequence[str], chunk_size: int = 256,
                chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """Yield the records of all `paths` in order, at most `chunk_size` records or about
    `chunk_bytes` of jsonl text at a time."""
    for path in paths:
        kind, compression = input_format(path)
        logger.debug("reading %s (%s%s)", path, kind, f", {compression}" if compression else "")
        if kind == "parquet":
            yield from _parquet_chunks(path, keys, chunk_size)
        else:
            yield from _jsonl_chunks(path, compression, chunk_size, chunk_bytes)


def _jsonl_chunks(path: str, compression: str | None, chunk_size: int, chunk_bytes: int) -> Iterator[Chunk]:
    items: list[tuple[int, str | dict[str, Any]]] = []
    nbytes = 0
    try:
        with open_text(path, compression) as stream:
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue  # blank lines (a trailing newline, say) carry no record
                items.append((number, line))
                nbytes += len(line)
                if len(items) >= chunk_size or nbytes >= chunk_bytes:
                    yield Chunk(path, items, "line")
                    items, nbytes = [], 0
    except UnicodeDecodeError:
        raise not_utf8_error(path, compression) from None
    except (OSError, EOFError) as exc:
        raise BridgeError(f"{path}: cannot read ({type(exc).__name__}: {exc}); is the file complete and UTF-8?") from exc
    if items:
        yield Chunk(path, items, "line")


def _parquet_chunks(path: str, keys: Sequence[str], chunk_size: int) -> Iterator[Chunk]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise BridgeError(f"{path} is parquet; pip install pyarrow (or bridge[data])") from exc
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for broken files
        raise BridgeError(f"{path}: not a readable parquet file ({exc})") from exc
    columns = parquet.schema_arrow.names
    missing = [key for key in keys if key not in columns]
    if missing:
        raise BridgeError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(columns)}); pass --json-keys")
    row = 0
    for batch in parquet.iter_batches(batch_size=chunk_size, columns=list(keys)):
        records = batch.to_pylist()
        items = [(row + i + 1, record) for i, record in enumerate(records)]
        row += len(records)
        yield Chunk(path, items, "row")


def parse_record(payload: str | dict[str, Any]) -> dict[str, Any]:
    """A record as a dict; raises ValueError with a short reason for malformed JSON."""
    if isinstance(payload, dict):
        return payload
    try:
        record = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return record


def count_records(paths: Iterable[str], max_scan_bytes: int = 1 << 30) -> int | None:
    """Cheap total for the progress bar: line count of uncompressed jsonl, row count of parquet;
    None when an input is compressed or the jsonl is bigger than `max_scan_bytes` (counting would
    read the corpus twice)."""
    total = 0
    paths = list(paths)
    jsonl_bytes = sum(os.path.getsize(p) for p in paths if input_format(p)[0] == "jsonl")
    if jsonl_bytes > max_scan_bytes:
        return None
    for path in paths:
        kind, compression = input_format(path)
        if compression is not None:
            return None
        if kind == "parquet":
            try:
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
            except Exception:
                return None
        else:
            with open(path, "rb") as stream:
                total += sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(1 << 24), b""))
    return total
