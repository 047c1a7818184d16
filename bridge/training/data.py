"""Training batches: documents packed into fixed-length samples with EOD between them, shuffled by seed.

The token stream is the documents of a split in a seeded order, epoch after epoch (a new order per
epoch); sample k is the window [k*s, k*s + s + 1) of that stream (inputs and shifted labels), and
samples are shuffled within blocks of about one epoch. Everything is a pure function of (seed, k),
so the data position of a run is one integer (consumed samples) and a resumed or re-laid-out run
sees exactly the same batches. Memory is O(documents), whatever the corpus size.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bridge.data.indexed import IndexedDataset, has_loss_mask, loss_mask_prefix, strip_suffix
from bridge.data.sources import not_utf8_error
from bridge.errors import BridgeError
from bridge.parallel.context import split_sequence
from bridge.training.packing import PackingFlags, pack_fields

log = logging.getLogger(__name__)


class Documents:
    """Documents from indexed datasets and/or jsonl files, as (tokens, loss mask or None) by number."""

    def __init__(self, paths: Sequence[str], *, text_key: str = "text", tokenizer: Any = None,
                 use_loss_mask: bool = False, vocab_size: int | None = None) -> None:
        self._parts: list[tuple[Any, Any]] = []  # (token source, mask source) with .document(i) or list
        counts = []
        for path in paths:
            if path.endswith(".jsonl"):
                docs = _tokenize_jsonl(Path(path), text_key, tokenizer)
                _check_token_ids(path, docs, vocab_size)
                self._parts.append((docs, None))
                counts.append(len(docs))
            else:
                prefix = strip_suffix(path)
                tokens = IndexedDataset(prefix)
                mask = IndexedDataset(loss_mask_prefix(prefix)) if use_loss_mask and has_loss_mask(prefix) else None
                self._parts.append((tokens, mask))
                counts.append(tokens.num_documents)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.has_mask = any(m is not None for _, m in self._parts)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def get(self, doc: int) -> tuple[np.ndarray, np.ndarray | None]:
        part = int(np.searchsorted(self._starts, doc, side="right")) - 1
        tokens, mask = self._parts[part]
        local = doc - int(self._starts[part])
        if isinstance(tokens, list):
            return tokens[local], None
        return tokens.document(local), None if mask is None else mask.document(local)


def _tokenize_jsonl(path: Path, key: str, tokenizer: Any) -> list[np.ndarray]:
    if tokenizer is None:
        raise BridgeError(f"{path} is text; training on .jsonl needs a tokenizer (the checkpoint's hf_meta/ or --tokenizer)")
    texts = []
    try:
        with path.open(encoding="utf-8") as stream:
            for number, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)[key])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise BridgeError(f"{path}:{number} is not a JSON object with a {key!r} field; fix it or pass "
                                      "--text-key") from None
    except UnicodeDecodeError:
        raise not_utf8_error(str(path)) from None
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    log.info("tokenized %d documents from %s", len(ids), path)
    return [np.asarray(t, dtype=np.int64) for t in ids if len(t)]


def _check_token_ids(path: str, docs: list[np.ndarray], vocab_size: int | None) -> None:
    """Text tokenized by a tokenizer that is not the model's can give ids past its vocabulary (indexed datasets are
    checked before the ranks start: bridge.training.plan)."""
    high = max((int(doc.max()) for doc in docs), default=-1)
    if vocab_size is not None and high >= vocab_size:
        raise BridgeError(f"{path} tokenizes to token ids up to {high}, but the model's vocabulary has {vocab_size} "
                          f"tokens (ids 0 to {vocab_size - 1}); use the model's own tokenizer (--tokenizer)")


def split_documents(n: int, split: str) -> list[np.ndarray]:
    """Megatron's --split "969,30,1": contiguous document ranges for train / valid / test."""
    weights = np.array([float(w) for w in split.replace("/", ",").split(",")] + [0.0, 0.0])[:3]
    bounds = np.round(np.cumsum(weights / weights.sum()) * n).astype(np.int64)
    bounds = np.concatenate([[0], bounds])
    bounds[-1] = n
    return [np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(3)]


def _with_eod_length(docs: Documents, doc: int, eod: int) -> int:
    """Tokens of the document plus the EOD the packers append when it does not end with one."""
    tokens, _ = docs.get(doc)
    return tokens.size + (0 if tokens.size and int(tokens[-1]) == eod else 1)


def _with_eod(docs: Documents, doc: int, eod: int) -> tuple[np.ndarray, np.ndarray]:
    """The document's tokens ending with EOD, and its loss mask (the appended EOD trained only without SFT masks)."""
    t, m = docs.get(doc)
    t = np.asarray(t, dtype=np.int64)
    m = np.ones(t.size, np.int64) if m is None else np.asarray(m, dtype=np.int64)
    if t.size == 0 or int(t[-1]) != eod:
        t = np.append(t, eod)
        m = np.append(m, 0 if docs.has_mask else 1)
    return t, m


@dataclass
class _Epoch:
    order: np.ndarray  # documents of the split in this epoch's order
    ends: np.ndarray   # cumulative token ends (EOD included) in that order


class PackedDataset:
    """Samples of `seq_length + 1` tokens (and label loss masks) from documents, EOD between documents."""

    def __init__(self, docs: Documents, doc_ids: np.ndarray, seq_length: int, seed: int, eod: int) -> None:
        if doc_ids.size == 0:
            raise BridgeError("a data split has no documents; give more documents or change --split")
        self.docs, self.doc_ids, self.seq_length, self.seed, self.eod = docs, doc_ids, seq_length, seed, eod
        lengths = np.array([self._doc_len(int(d)) for d in doc_ids], dtype=np.int64)
        self.tokens_per_epoch = int(lengths.sum())
        self._lengths = dict(zip(doc_ids.tolist(), lengths.tolist()))
        self.block = max(1, self.tokens_per_epoch // seq_length)
        self._epochs: dict[int, _Epoch] = {}
        self._block_orders: dict[int, np.ndarray] = {}

    def _doc_len(self, doc: int) -> int:
        return _with_eod_length(self.docs, doc, self.eod)

    def _epoch(self, e: int) -> _Epoch:
        if e not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.clear()
            order = np.random.default_rng([self.seed, 0, e]).permutation(self.doc_ids)
            ends = np.cumsum([self._lengths[int(d)] for d in order]).astype(np.int64)
            self._epochs[e] = _Epoch(order, ends)
        return self._epochs[e]

    def _stream(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and loss masks of stream positions [start, start + count)."""
        tokens, masks, pos = [], [], start
        while pos < start + count:
            e, within = divmod(pos, self.tokens_per_epoch)
            epoch = self._epoch(e)
            i = int(np.searchsorted(epoch.ends, within, side="right"))
            doc_start = int(epoch.ends[i - 1]) if i else 0
            t, m = _with_eod(self.docs, int(epoch.order[i]), self.eod)
            take = min(t.size - (within - doc_start), start + count - pos)
            offset = within - doc_start
            tokens.append(t[offset:offset + take])
            masks.append(m[offset:offset + take])
            pos += take
        return np.concatenate(tokens), np.concatenate(masks)

    def _block_order(self, block: int) -> np.ndarray:
        """The seeded sample order within `block`, drawn once: every sample of a step reads it."""
        if block not in self._block_orders:
            if len(self._block_orders) > 2:
                self._block_orders.clear()
            self._block_orders[block] = np.random.default_rng([self.seed, 1, block]).permutation(self.block)
        return self._block_orders[block]

    def real_tokens(self, k: int) -> int:
        """Input tokens of sample k that are not padding: all of them (the stream has no padding)."""
        return self.seq_length

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample k: tokens [s+1] and the loss mask of each token [s+1]."""
        block, index = divmod(k, self.block)
        j = int(self._block_order(block)[index])
        return self._stream((block * self.block + j) * self.seq_length, self.seq_length + 1)


class WholeDocumentDataset:
    """Samples of `seq_length + 1` tokens that hold whole documents only (`--sft`: a conversation is never split).

    Each epoch's documents, in a seeded order, fill samples one after another: a document that does not fit in
    what is left of a sample starts the next one, and the rest of the sample is padding (a token that is not EOD,
    loss mask 0, in a document of its own after the last EOD). A document longer than a sample is cut to it
    (counted, and logged once). Sample k is a pure function of (seed, k), as for PackedDataset.
    """

    def __init__(self, docs: Documents, doc_ids: np.ndarray, seq_length: int, seed: int, eod: int) -> None:
        if doc_ids.size == 0:
            raise BridgeError("a data split has no documents; give more documents or change --split")
        self.docs, self.doc_ids, self.seq_length, self.seed, self.eod = docs, doc_ids, seq_length, seed, eod
        self.pad = 0 if eod != 0 else 1
        self._lengths = {int(d): _with_eod_length(docs, int(d), eod) for d in doc_ids}
        self.truncated = sum(n > seq_length + 1 for n in self._lengths.values())
        if self.truncated:
            log.warning("%d of %d documents are longer than --seq-length %d (+1) and are cut to it; raise "
                        "--seq-length to keep them whole", self.truncated, doc_ids.size, seq_length)
        self._epochs: dict[int, list[np.ndarray]] = {}
        self._starts = [0]  # first sample of each epoch computed so far

    def _epoch(self, e: int) -> list[np.ndarray]:
        """The samples of epoch e: each an array of document ids, in the epoch's seeded order."""
        if e not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.pop(min(self._epochs))
            order = np.random.default_rng([self.seed, 3, e]).permutation(self.doc_ids)
            samples, current, used = [], [], 0
            for doc in order.tolist():
                n = min(self._lengths[doc], self.seq_length + 1)
                if current and used + n > self.seq_length + 1:
                    samples.append(np.array(current))
                    current, used = [], 0
                current.append(doc)
                used += n
            samples.append(np.array(current))
            self._epochs[e] = samples
        return self._epochs[e]

    def _locate(self, k: int) -> tuple[int, int]:
        while self._starts[-1] <= k:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self._epoch(e)))
        e = int(np.searchsorted(self._starts, k, side="right")) - 1
        return e, k - self._starts[e]

    def real_tokens(self, k: int) -> int:
        """Input tokens of sample k that are not padding (the trainer's real tokens/s and packing efficiency)."""
        e, index = self._locate(k)
        filled = sum(min(self._lengths[doc], self.seq_length + 1) for doc in self._epoch(e)[index].tolist())
        return min(filled, self.seq_length)

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample k: tokens [s+1] and the loss mask of each token [s+1]."""
        e, index = self._locate(k)
        size = self.seq_length + 1
        tokens, masks = np.full(size, self.pad, np.int64), np.zeros(size, np.int64)
        at = 0
        for doc in self._epoch(e)[index].tolist():
            t, m = _with_eod(self.docs, doc, self.eod)
            n = min(t.size, size - at)
            tokens[at:at + n], masks[at:at + n] = t[:n], m[:n]
            at += n
        return tokens, masks


class MockDataset:
    """Uniform random tokens (Megatron's --mock-data): benchmarks and smoke tests without a corpus."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int) -> None:
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed

    def real_tokens(self, k: int) -> int:
        return self.seq_length

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.random.default_rng([self.seed, 2, k]).integers(0, self.vocab_size, self.seq_length + 1)
        return tokens, np.ones_like(tokens)


def micro_batch(dataset: PackedDataset | WholeDocumentDataset | MockDataset, first: int, size: int, device: torch.device, *, cp: int = 1,
                cp_rank: int = 0, packing: PackingFlags = PackingFlags()) -> dict[str, torch.Tensor]:
    """Samples first..first+size-1 -> tokens/labels/loss_mask [b, s/cp] on `device`, and `loss_tokens` (a scalar).

    With context parallelism a rank gets its two load-balanced chunks of every sequence (chunks cp_rank and
    2*cp-1-cp_rank of 2*cp); `loss_tokens` counts the trained tokens of the whole micro-batch, so each CP
    rank's partial loss sum / loss_tokens adds up over CP to the micro-batch's mean loss. `packing`: Megatron-LM's
    reset-attention-mask / reset-position-ids / eod-mask-loss (bridge.training.packing; CP refuses them up front).
    """
    pairs = [dataset.sample(k) for k in range(first, first + size)]
    tokens = torch.from_numpy(np.stack([t for t, _ in pairs]))
    mask = torch.from_numpy(np.stack([m for _, m in pairs]))[:, 1:].float()
    local = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}
    if packing != PackingFlags():
        local.update(pack_fields(local["tokens"], mask, dataset.eod, packing))
    longest = local.pop("max_seqlen", None)  # a host integer for the kernels: never copied to the device
    out = {k: _to_device(v if k == "cu_seqlens" else split_sequence(v, cp, cp_rank, dim=1), device)
           for k, v in local.items()}
    out["loss_tokens"] = _to_device(local["loss_mask"].sum(), device)
    if longest is not None:
        out["max_seqlen"] = longest
    return out


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An asynchronous copy on CUDA (from pinned memory): the trainer fetches the next step's batches while the
    GPU still runs this step, and a copy from pageable memory would wait for the GPU to go idle."""
    if device.type != "cuda":
        return t.to(device)
    return t.contiguous().pin_memory().to(device, non_blocking=True)


def step_micro_batches(dataset: PackedDataset | WholeDocumentDataset | MockDataset, consumed: int, global_batch: int, micro: int, dp: int,
                       dp_rank: int, device: torch.device, *, cp: int = 1, cp_rank: int = 0,
                       packing: PackingFlags = PackingFlags()) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch that starts at sample `consumed` (its CP chunks of them).

    DP rank d takes the d-th slice of the global batch, in micro-batches of `micro`, so the set of
    micro-batches of a step is the same for every DP size; CP ranks of one DP rank share the samples.
    """
    per_rank = global_batch // dp
    base = consumed + dp_rank * per_rank
    return [micro_batch(dataset, base + j * micro, micro, device, cp=cp, cp_rank=cp_rank, packing=packing)
            for j in range(per_rank // micro)]
