"""`bridge data prepare`: tokenize jsonl/parquet into Megatron indexed datasets with a process pool.

The main process reads chunks of raw records and writes tokens; workers parse JSON, tokenize, and
return flat numpy arrays (cheap to pickle). At most `workers * IN_FLIGHT_PER_WORKER` chunks are
in flight: `Pool.imap` would read the whole input ahead of the workers, and memory must not depend
on corpus size. Results come back in input order, so output order equals input order for any
number of workers.
"""
from __future__ import annotations

import collections
from contextlib import closing
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from bridge.data.indexed import IndexedDatasetWriter, loss_mask_prefix, token_dtype
from bridge.data.sources import Chunk, count_records, expand_inputs, iter_chunks
from bridge.data.sources import parse_record
from bridge.data.tokenizer import assistant_mask, eod_id, load_tokenizer, render_chat, vocab_size
from bridge.errors import BridgeError

logger = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 4
_MAX_LOGGED_PROBLEMS = 10


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """What to tokenize and how; mirrors Megatron-LM's `tools/preprocess_data.py` flags."""

    inputs: tuple[str, ...]
    """jsonl (.gz/.zst) or parquet files, read in the given order."""
    output_prefix: str
    """Outputs are `{output_prefix}_{key}_document.{bin,idx}` (Megatron's naming)."""
    tokenizer: str
    """HF tokenizer: local folder, Hub id, or bridge checkpoint folder."""
    json_keys: tuple[str, ...] = ("text",)
    """Record fields to tokenize; one dataset per key."""
    append_eod: bool = False
    """Append the tokenizer's EOS id to every document (Megatron's `--append-eod`)."""
    add_special_tokens: bool = False
    """Let the tokenizer add its BOS/EOS template to each document (plain text mode only)."""
    chat: bool = False
    """Records hold chat `messages`; render with the chat template and write a loss mask."""
    workers: int = 1
    """Tokenizer processes; 1 tokenizes in this process."""
    chunk_size: int = 256
    """Records per task sent to a worker."""
    skip_bad_records: bool = False
    """Skip malformed/missing-key records with a warning instead of stopping at the first one."""
    progress: bool = True
    """Show a tqdm bar with docs/s and tokens/s."""


@dataclass
class PrepareResult:
    """What was written, for the CLI summary and for tests."""

    prefixes: dict[str, str]
    dtype: str
    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    records: int = 0
    skipped_bad: int = 0
    skipped_empty: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return sum(self.tokens.values()) / max(self.seconds, 1e-9)


@dataclass
class EncodedChunk:
    """One chunk's output: per key the tokens back to back and the document lengths (EOD included)."""

    tokens: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    masks: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """`file:line: reason` of each record that could not be used."""
    empty: list[str] = field(default_factory=list)
    """`file:line` of each record skipped because a document had no tokens."""
    records: int = 0
    documents: int = 0


class Encoder:
    """Turns a Chunk of raw records into token arrays; picklable, so it can be sent to workers.

    Plain mode calls the fast tokenizer's Rust backend once per chunk (`encode_batch`: the same ids
    as `tokenizer(text)["input_ids"]` without transformers' per-call overhead); slow tokenizers go
    through `tokenizer(...)`. Pool workers set TOKENIZERS_PARALLELISM=false, so each is one thread;
    with workers=1 the Rust tokenizer follows the caller's TOKENIZERS_PARALLELISM.
    """

    def __init__(self, tokenizer: Any, *, keys: tuple[str, ...], dtype: np.dtype, eod: int | None,
                 add_special_tokens: bool, chat: bool) -> None:
        if chat and not getattr(tokenizer, "is_fast", False):
            raise BridgeError("--chat needs a fast tokenizer (tokenizer.json) for token offsets")
        self.tokenizer, self.keys, self.dtype, self.eod = tokenizer, keys, np.dtype(dtype), eod
        self.backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None
        self.add_special_tokens, self.chat = add_special_tokens, chat
        if chat and not getattr(tokenizer, "chat_template", None):
            raise BridgeError("the tokenizer has no chat_template, so --chat cannot render messages; use one that has")
        # End-of-turn tokens such as <|im_end|> are added special tokens, not named ones: take both.
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = set(getattr(tokenizer, "all_special_ids", [])) | {i for i, t in added.items() if t.special}
        self.special_ids = np.array(sorted(special), dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        """Plain text with a fast tokenizer needs only the Rust backend: a worker then unpickles it
        without importing transformers (seconds of start-up per worker otherwise)."""
        state = dict(self.__dict__)
        if self.backend is not None and not self.chat:
            state["tokenizer"] = None
        return state

    def __call__(self, chunk: Chunk) -> EncodedChunk:
        out = EncodedChunk(records=len(chunk.items))
        values: dict[str, list[Any]] = {key: [] for key in self.keys}
        where: list[str] = []
        for number, payload in chunk.items:
            try:
                fields = self._fields(parse_record(payload))
            except ValueError as exc:
                out.problems.append(f"{chunk.where(number)}: {exc}")
                continue
            where.append(chunk.where(number))
            for key in self.keys:
                values[key].append(fields[key])
        encoded = {}
        for key in self.keys:
            encoded[key] = self._encode_chat(values[key]) if self.chat else self._encode_text(values[key])
        keep = np.array([all(len(encoded[k][i][0]) > 0 for k in self.keys) for i in range(len(where))], dtype=bool)
        out.empty = [w for w, kept in zip(where, keep) if not kept]
        out.documents = int(keep.sum())
        for key in self.keys:
            docs = [doc for doc, kept in zip(encoded[key], keep) if kept]
            out.tokens[key] = self._flatten([ids for ids, _ in docs], self.eod, self.dtype)
            if self.chat:
                out.masks[key] = self._flatten([mask for _, mask in docs], 0 if self.eod is not None else None, np.uint8)
        return out

    def _fields(self, record: dict[str, Any]) -> dict[str, Any]:
        """The values of `keys` in a record (chat: rendered text and assistant spans); ValueError
        with a short reason when the record cannot be used."""
        fields = {}
        for key in self.keys:
            if key not in record:
                known = ", ".join(list(record)[:8])
                raise ValueError(f"no key '{key}' (keys: {known}); pass --json-keys")
            value = record[key]
            if self.chat:
                value = render_chat(self.tokenizer, value)
            elif not isinstance(value, str):
                raise ValueError(f"'{key}' is {type(value).__name__}, expected a string")
            fields[key] = value
        return fields

    def _encode_text(self, texts: list[str]) -> list[tuple[list[int], None]]:
        if self.backend is not None:
            encodings = self.backend.encode_batch(texts, add_special_tokens=self.add_special_tokens)
            return [(enc.ids if text else [], None) for enc, text in zip(encodings, texts)]
        ids = self.tokenizer(texts, add_special_tokens=self.add_special_tokens)["input_ids"] if texts else []
        return [(doc if text else [], None) for doc, text in zip(ids, texts)]

    def _encode_chat(self, rendered: list[tuple[str, list[tuple[int, int]]]]) -> list[tuple]:
        """Tokenize rendered conversations with offsets; mask all but assistant tokens."""
        docs: list[tuple] = []
        for text, spans in rendered:
            enc = self.backend.encode(text, add_special_tokens=False)
            ids = np.array(enc.ids, dtype=np.int64)
            offsets = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)  # (T, 2) char offsets
            docs.append((ids, assistant_mask(offsets, ids, spans, self.special_ids)))
        return docs

    @staticmethod
    def _flatten(docs: list[Any], eod: int | None, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
        """Documents back to back (EOD after each when `eod` is not None) and their lengths."""
        lengths = np.fromiter((len(doc) for doc in docs), dtype=np.int64, count=len(docs))
        parts = [np.asarray(doc, dtype=np.int64) for doc in docs if len(doc)]
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if eod is not None and docs:
            flat = np.insert(flat, np.cumsum(lengths), eod)
            lengths = lengths + 1
        return flat.astype(dtype), lengths.astype(np.int32)


def prepare(config: PrepareConfig) -> PrepareResult:
    """Tokenize `config.inputs` into indexed datasets; nothing is left on disk if it fails."""
    if config.workers < 1:
        raise BridgeError(f"--workers must be at least 1, got {config.workers}")
    if not config.json_keys:
        raise BridgeError("no --json-keys given; name the field(s) that hold the text")
    paths = expand_inputs(config.inputs)
    tokenizer = load_tokenizer(config.tokenizer)
    dtype = token_dtype(vocab_size(tokenizer))
    encoder = Encoder(
        tokenizer,
        keys=config.json_keys,
        dtype=dtype,
        eod=eod_id(tokenizer) if config.append_eod else None,
        add_special_tokens=config.add_special_tokens,
        chat=config.chat,
    )
    prefixes = {key: f"{config.output_prefix}_{key}_document" for key in config.json_keys}
    result = PrepareResult(prefixes=prefixes, dtype=dtype.name, tokens={key: 0 for key in prefixes})
    writers = _open_writers(prefixes, dtype, config.chat)
    start = time.perf_counter()
    try:
        chunks = iter_chunks(paths, config.json_keys, config.chunk_size)
        total = count_records(paths) if config.progress else None
        # closing(): a stop in the loop shuts the pool down now, not when the generator is collected
        with closing(_encode_all(encoder, chunks, config.workers)) as encoded_chunks, \
                tqdm(total=total, unit="doc", disable=None if config.progress else True, dynamic_ncols=True) as bar:
            for encoded in encoded_chunks:
                _consume(encoded, writers, result, config)
                _update_progress(bar, encoded, result, start)
        if result.documents == 0:
            raise BridgeError(f"no document with tokens in {', '.join(paths)}; check --json-keys and the input")
        for writer in writers.values():
            writer.finalize()
        for writer in writers.values():
            writer.commit()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    result.seconds = time.perf_counter() - start
    _log_summary(result)
    return result


def _open_writers(prefixes: dict[str, str], dtype: np.dtype, chat: bool) -> dict[str, IndexedDatasetWriter]:
    """Token writers keyed by json key, plus `<key>:mask` loss-mask writers in chat mode."""
    writers: dict[str, IndexedDatasetWriter] = {}
    try:
        for key, prefix in prefixes.items():
            writers[key] = IndexedDatasetWriter(prefix, dtype)
            if chat:
                writers[f"{key}:mask"] = IndexedDatasetWriter(loss_mask_prefix(prefix), np.uint8)
    except OSError as exc:
        for writer in writers.values():
            writer.abort()
        raise BridgeError(f"cannot write the output: {exc}; check --output-prefix") from exc
    return writers


def _encode_all(encoder: Encoder, chunks: Iterable[Chunk], workers: int) -> Iterator[EncodedChunk]:
    """Encoded chunks in input order: inline for one worker, else through a bounded process pool."""
    if workers == 1:
        yield from map(encoder, chunks)
        return
    pool = _pool_context().Pool(workers, initializer=_init_worker, initargs=(encoder,))
    try:
        yield from _ordered_bounded_map(pool, _encode_in_worker, chunks, workers * IN_FLIGHT_PER_WORKER)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _pool_context() -> Any:
    """Workers are started by a forkserver, never forked from the caller.

    Forking a process that runs other threads (torch's and gloo's pools, a notebook kernel's) can
    copy a lock that one of them holds into the worker, which then waits on it forever: CI hung
    that way. The forkserver preloads this module (numpy, no torch or transformers), and the
    encoder it receives carries only the Rust tokenizer, so a worker starts in about 0.1 s. Forked
    workers were no faster: each copy-on-write fault of the parent's pages costs them.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context()  # e.g. Windows: spawn
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _ordered_bounded_map(pool: Any, func: Callable, items: Iterable, max_in_flight: int) -> Iterator:
    """Like `pool.imap(func, items)` but never more than `max_in_flight` items read ahead."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(func, (item,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


_WORKER_ENCODER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    """Worker setup: one tokenizer thread per process, and Ctrl-C is the parent's to handle."""
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_ENCODER = encoder


def _encode_in_worker(chunk: Chunk) -> EncodedChunk:
    assert _WORKER_ENCODER is not None, "worker not initialised"
    return _WORKER_ENCODER(chunk)


def _consume(encoded: EncodedChunk, writers: dict[str, IndexedDatasetWriter], result: PrepareResult,
             config: PrepareConfig) -> None:
    """Write one encoded chunk, or stop at its first bad record unless bad records are skipped."""
    if encoded.problems and not config.skip_bad_records:
        raise BridgeError(f"{encoded.problems[0]}; fix the record or pass --skip-bad-records")
    for problem in encoded.problems:
        if result.skipped_bad < _MAX_LOGGED_PROBLEMS:
            logger.warning("skipping %s", problem)
        result.skipped_bad += 1
    for where in encoded.empty:
        if result.skipped_empty < _MAX_LOGGED_PROBLEMS:
            logger.warning("skipping %s: empty document (no tokens)", where)
        result.skipped_empty += 1
    for key, (flat, lengths) in encoded.tokens.items():
        writers[key].add_documents(flat, lengths)
        result.tokens[key] += int(flat.size)
    for key, (mask, lengths) in encoded.masks.items():
        writers[f"{key}:mask"].add_documents(mask, lengths)
    result.records += encoded.records
    result.documents += encoded.documents


def _update_progress(bar: tqdm, encoded: EncodedChunk, result: PrepareResult, start: float) -> None:
    bar.update(encoded.records)
    elapsed = max(time.perf_counter() - start, 1e-9)
    bar.set_postfix(tokens_per_s=f"{sum(result.tokens.values()) / elapsed:,.0f}", refresh=False)


def _log_summary(result: PrepareResult) -> None:
    """Details at DEBUG (the CLI prints its own summary); skipped records at WARNING."""
    for key, prefix in result.prefixes.items():
        logger.debug("wrote %s.{bin,idx}: %d documents, %d tokens (%s)", prefix, result.documents,
                     result.tokens[key], result.dtype)
    if result.skipped_bad:
        logger.warning("skipped %d bad records", result.skipped_bad)
    if result.skipped_empty:
        logger.warning("skipped %d empty documents", result.skipped_empty)
    logger.debug("%d records in %.1f s: %.0f docs/s, %.0f tokens/s", result.records, result.seconds,
                 result.records / max(result.seconds, 1e-9), result.tokens_per_second)
