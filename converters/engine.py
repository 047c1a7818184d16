"""The streaming conversion engine: a source yields global Megatron tensors one at a time, a sink takes them.

HF -> Megatron is `HFSource -> MegatronSink`; export is `MegatronSource -> HFSink`; reshard is
`MegatronSource -> MegatronSink`. Sources check accounting (every tensor consumed exactly once)
before the first byte is written and again at the end; sinks check that every target was produced.
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch
from tqdm import tqdm

from bridge.checkpoint import CheckpointMeta
from bridge.config import ModelConfig
from bridge.converters import fp8, mxfp4
from bridge.converters.hf import PlannedTensor, SafetensorsReader, StreamingSafetensorsWriter
from bridge.converters.megatron_legacy import LegacyCheckpointReader, LegacyCheckpointWriter
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from bridge.memory import return_large_buffers_to_os
from bridge.mapping import Conversion, expected_hf_shapes, megatron_shape
from bridge.sharding import LocalKey, Split, extra_state_keys, gather, is_expert_key, localize, rule_for, split

log = logging.getLogger(__name__)

#: HF tensors that are derived buffers, not weights: accepted in a source and not converted.
DERIVED_HF_SUFFIXES: tuple[str, ...] = ("rotary_emb.inv_freq",)
TIED_HF_HEAD = "lm_head.weight"
TIED_HF_EMBEDDING = "model.embed_tokens.weight"
#: Dtypes a weight may be stored in; FP8 only for a weight that comes with its block scales (`weight_scale_inv`).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
#: Bytes a file spends per tensor besides its data (zip record headers, alignment, index entries): for space checks.
PER_TENSOR_OVERHEAD = 512


def _listing(names: Sequence[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class Source(Protocol):
    def tensors(self, meta: bool = False) -> Iterator[tuple[Conversion, torch.Tensor]]: ...
    def finish(self) -> None: ...


class Sink(Protocol):
    def put(self, conv: Conversion, tensor: torch.Tensor) -> None: ...
    def close(self) -> None: ...


class HFSource:
    """HF safetensors -> global Megatron tensors through the family's mapping rows."""

    def __init__(self, reader: SafetensorsReader, cfg: ModelConfig, conversions: Sequence[Conversion],
                 dtype: torch.dtype | None, skip_prefixes: Sequence[str] = ()) -> None:
        """`skip_prefixes`: HF tensors deliberately not converted (e.g. DeepSeek's MTP layer); logged, counted."""
        self.reader, self.cfg, self.conversions, self.dtype = reader, cfg, conversions, dtype
        self.skipped = sorted(n for n in reader.names() if skip_prefixes and n.startswith(tuple(skip_prefixes)))
        if self.skipped:
            log.info("not converting %d HF tensors under %s (no Megatron counterpart)", len(self.skipped), ", ".join(skip_prefixes))
        needed = {n for conv in conversions for n in conv.hf}
        self._scales = fp8.scale_names(reader.names(), needed)
        self._mxfp4 = mxfp4.quantised_names(reader.names(), needed)
        self.nonfinite: list[str] = []
        self._check_accounting()
        self._check_headers()

    def _check_accounting(self) -> None:
        needed = {name for conv in self.conversions for name in conv.hf}
        available = {n for n in self.reader.names() if not n.endswith(DERIVED_HF_SUFFIXES)}
        available -= set(self.skipped) | set(self._scales.values()) | {n for pair in self._mxfp4.values() for n in pair}
        available |= set(self._mxfp4)  # read through its blocks and scales
        if self.cfg.tie_word_embeddings:
            available.discard(TIED_HF_HEAD)  # checked equal to the embedding in finish()
        missing, unexpected = needed - available, available - needed
        if missing or unexpected:
            parts = [f"missing {len(missing)}: {_listing(missing)}" if missing else "",
                     f"unexpected {len(unexpected)}: {_listing(unexpected)}" if unexpected else ""]
            raise BridgeError(f"{self.reader.folder} does not match {self.cfg.architecture}'s mapping: "
                              + "; ".join(p for p in parts if p) + " (is config.json the one these weights belong to?)")

    def _check_headers(self) -> None:
        """Every tensor's stored shape and dtype against what the config implies, from the headers alone, before
        anything is written: a transposed or mis-sized weight, or an integer one, would convert into garbage."""
        found = ((name, self._stored(name), shape, allowed) for name, shape, allowed in self._expected())
        check_stored(f"{self.reader.folder} does not match its config.json", found,
                     "check that config.json belongs to these weights and that they are stored as floats "
                     "(FP8 only with their weight_scale_inv, uint8 only as MXFP4 _blocks and _scales)")

    def _expected(self) -> Iterator[tuple[str, tuple[int, ...], tuple[torch.dtype, ...]]]:
        """(stored name, shape, dtypes it may have) of every tensor read: mapped weights (an MXFP4 one as its blocks
        and scales), FP8 scales, a tied head's copy; a stacked tensor once, though every expert reads it."""
        seen: set[str] = set()
        for conv in self.conversions:
            for name, shape in zip(conv.hf, expected_hf_shapes(conv, self.cfg)):
                if name in seen:
                    continue
                seen.add(name)
                if name in self._mxfp4:
                    yield from zip(self._mxfp4[name], mxfp4.stored_shapes(shape), ((torch.uint8,),) * 2)
                    continue
                yield name, shape, FLOAT_DTYPES + (FP8_DTYPES if name in self._scales else ())
                if name in self._scales and len(shape) == 2:
                    b0, b1 = self.cfg.extra.get("fp8_block") or fp8.DEFAULT_BLOCK
                    yield self._scales[name], (math.ceil(shape[0] / b0), math.ceil(shape[1] / b1)), FLOAT_DTYPES
        if self.cfg.tie_word_embeddings and TIED_HF_HEAD in self.reader.names():
            yield TIED_HF_HEAD, (self.cfg.vocab_size, self.cfg.hidden_size), FLOAT_DTYPES

    def _stored(self, name: str) -> torch.Tensor | None:
        """The stored tensor on `meta`; None for a dtype torch cannot represent here (U16, F8_E8M0, ...)."""
        try:
            return self.reader.meta(name)
        except KeyError:
            return None

    def tensors(self, meta: bool = False, only: Sequence[Conversion] | None = None) -> Iterator[tuple[Conversion, torch.Tensor]]:
        """Every conversion's tensor, or those of `only` (one process's share of a conversion in several)."""
        for conv in self.conversions if only is None else only:
            tensor = self._planned(conv) if meta else conv.to_megatron([self.read(n, conv.hf_index) for n in conv.hf], self.cfg)
            yield conv, tensor if self.dtype is None else tensor.to(self.dtype)

    def _planned(self, conv: Conversion) -> torch.Tensor:
        """The tensor a conversion will make, on `meta`: the Megatron shape its kind declares (the stored shapes are
        checked against it up front), in its sources' promoted dtype. Not the transform run on `meta` tensors: that
        gives the same, but a `torch.cat` on `meta` imports torch._dynamo, half a second of a conversion's start."""
        dtype = functools.reduce(torch.promote_types, (self._meta(n, conv.hf_index).dtype for n in conv.hf))
        return torch.empty(megatron_shape(conv.megatron, self.cfg), dtype=dtype, device="meta")

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """One HF tensor, or its `index` on dim 0 (an expert of a stacked tensor); FP8 block-quantised and MXFP4
        weights come back dequantised (bf16), one tensor (one expert) at a time."""
        if name in self._mxfp4:
            blocks, scales = self._mxfp4[name]
            tensor = mxfp4.dequantize(self.reader.get(blocks, index), self.reader.get(scales, index))
        elif name in self._scales:
            tensor = fp8.dequantize(self.reader.get(name), self.reader.get(self._scales[name]), self.cfg.extra.get("fp8_block"))
        else:
            tensor = self.reader.get(name, index)
        if not all_finite(tensor):
            self.nonfinite.append(name if index is None else f"{name}[{index}]")
        return tensor

    def _meta(self, name: str, index: int | None = None) -> torch.Tensor:
        if name in self._mxfp4:
            shape = mxfp4.dequantized_shape(tuple(self.reader.meta(self._mxfp4[name][0]).shape))
            tensor = torch.empty(shape, dtype=torch.bfloat16, device="meta")
        else:
            tensor = self.reader.meta(name)
            if name in self._scales:
                tensor = torch.empty(tensor.shape, dtype=torch.bfloat16, device="meta")
        return tensor if index is None else tensor[index]

    def finish(self) -> None:
        if self.nonfinite:
            log.warning("%d tensors hold NaN or Inf values (converted as they are): %s", len(self.nonfinite),
                        _listing(self.nonfinite))
        if self.cfg.tie_word_embeddings and TIED_HF_HEAD in self.reader.names():
            if not torch.equal(self.reader.get(TIED_HF_HEAD), self.reader.get(TIED_HF_EMBEDDING)):
                raise BridgeError("config says tie_word_embeddings but lm_head.weight differs from embed_tokens; "
                                  "set tie_word_embeddings=false in config.json")

    def share_report(self) -> list[str]:
        """What one process of a conversion over several reports for the whole-model checks: its non-finite reads."""
        return self.nonfinite

    def finish_shares(self, reports: Sequence[list[str]]) -> None:
        """`finish` for a conversion over several processes, from every process's `share_report`."""
        self.nonfinite = [name for report in reports for name in report]
        self.finish()


#: What `check_stored` takes per tensor: its label, the stored tensor on `meta` (None: a dtype torch cannot
#: represent), the shape it must have and the dtypes it may have.
Found = tuple[str, "torch.Tensor | None", tuple[int, ...], tuple[torch.dtype, ...]]


def check_stored(what: str, found: Iterable[Found], advice: str) -> None:
    """Raise one BridgeError listing every tensor whose stored shape or dtype is not what it must be."""
    shapes, dtypes = [], []
    for label, got, want, allowed in found:
        if got is not None and tuple(got.shape) != want:
            shapes.append(f"{label} {list(got.shape)} (expected {list(want)})")
        if got is None or got.dtype not in allowed:
            dtypes.append(f"{label} {'of an unknown dtype' if got is None else str(got.dtype).removeprefix('torch.')}")
    parts = [f"wrong shape ({len(shapes)}): {_listing(shapes)}" if shapes else "",
             f"not float32/bfloat16/float16 ({len(dtypes)}): {_listing(dtypes)}" if dtypes else ""]
    if shapes or dtypes:
        raise BridgeError(f"{what}: " + "; ".join(p for p in parts if p) + f"; {advice}")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in `tensor`. Its minimum and maximum are finite exactly when every element is (both propagate
    NaN): one vectorised reduction and no mask, where `isfinite(...).all()` on bf16 cost an import more than its
    reads."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_leftover(reports: Sequence[Sequence[str]]) -> None:
    """Every tensor of a checkpoint was read: by this process, or (several reports) by at least one of them."""
    left = sorted(set(reports[0]).intersection(*reports[1:]))
    if left:
        raise BridgeError(f"{len(left)} tensors of the checkpoint were not converted: {_listing(left)}")


def _localize(meta: CheckpointMeta, key: str) -> LocalKey:
    """Stage, chunk, EP rank and stage-local name of a global key in the checkpoint `meta` describes."""
    return localize(key, meta.layout, meta.config.num_layers, meta.transformer_impl, meta.config.num_experts)


def _ep_ranks(loc: LocalKey, layout: ParallelLayout) -> range:
    """EP ranks whose files hold a key: its own for an expert, every one for a dense weight."""
    return range(loc.ep_rank, loc.ep_rank + 1) if loc.ep_rank is not None else range(layout.ep)


class MegatronSource:
    """Megatron rank files -> global tensors: gather TP shards, map stage-local names to global layers."""

    def __init__(self, reader: LegacyCheckpointReader, meta: CheckpointMeta, conversions: Sequence[Conversion]) -> None:
        self.reader, self.meta, self.conversions = reader, meta, conversions
        self._check_accounting()
        self._check_shards()

    def _local(self, key: str) -> LocalKey:
        return _localize(self.meta, key)

    def _check_shards(self) -> None:
        """Every weight shard in the rank files against the shape bridge.json's model and layout give it, and a
        float dtype; from the files' indexes (no data read), before anything is written."""
        check_stored(f"{self.reader.root} does not hold the model and layout its bridge.json describes", self._stored_shards(),
                     "was it changed after it was written? re-create it")

    def _stored_shards(self) -> Iterator[Found]:
        """Every weight shard the rank files hold, copies included, with the shape the layout gives it."""
        cfg, layout = self.meta.config, self.meta.layout
        tied_copy = LocalKey(layout.pp - 1, layout.chunks - 1, "output_layer.weight")
        for conv in self.conversions:
            loc, rule = self._local(conv.megatron), rule_for(conv.megatron)
            n = self._shards(conv.megatron, loc)[1]
            target = torch.empty(megatron_shape(conv.megatron, cfg), device="meta")
            shards = [tuple(s.shape) for s in split(target, rule, n, self.meta.padded_vocab_size)]
            copies = [tied_copy] if conv.megatron == "embedding.word_embeddings.weight" and cfg.tie_word_embeddings \
                and layout.pp > 1 else []
            for place in [loc, *copies]:
                for ep_rank in _ep_ranks(place, layout):
                    for tp_rank in range(layout.tp):  # TP rank t holds shard t % n (n < TP: expert TP)
                        stored = self.reader.meta(tp_rank, place.pp_rank, place.chunk, place.name, ep_rank)
                        where = f"{layout.rank_dir(tp_rank, place.pp_rank, ep_rank)}[{place.chunk}]:{place.name}"
                        yield where, stored, shards[tp_rank % n], FLOAT_DTYPES

    def _check_accounting(self) -> None:
        locs = [self._local(c.megatron) for c in self.conversions] + list(self._extra_keys())
        expected = {(k.pp_rank, e, k.chunk, k.name) for k in locs for e in _ep_ranks(k, self.meta.layout)}
        present = {(p, e, c, n) for t, p, e, c, n in self.reader.entries() if t == 0}
        missing, unexpected = expected - present, present - expected
        if missing or unexpected:
            fmt = lambda keys: _listing([f"pp{p}/ep{e}/chunk{c}:{n}" for p, e, c, n in keys])  # noqa: E731
            parts = [f"missing {len(missing)}: {fmt(missing)}" if missing else "",
                     f"unexpected {len(unexpected)}: {fmt(unexpected)}" if unexpected else ""]
            raise BridgeError(f"{self.reader.root} does not hold what bridge.json describes: " + "; ".join(p for p in parts if p))

    def _extra_keys(self) -> Iterator[LocalKey]:
        """Keys that carry no weights of their own: TE `_extra_state` and the tied head copy (PP > 1)."""
        cfg, layout = self.meta.config, self.meta.layout
        if self.meta.transformer_impl == "transformer_engine":
            modules = dict.fromkeys(c.megatron.rsplit(".", 1)[0] for c in self.conversions)
            for module in modules:
                for key in extra_state_keys(module, layout, cfg.num_experts):
                    yield self._local(key)
        if cfg.tie_word_embeddings and layout.pp > 1:
            yield LocalKey(layout.pp - 1, layout.chunks - 1, "output_layer.weight")

    def _shards(self, key: str, loc: LocalKey) -> tuple[int, int]:
        """(EP rank, number of TP shards) to read a key from: experts split over ETP, the rest over TP."""
        if is_expert_key(key):
            return loc.ep_rank or 0, self.meta.layout.expert_tp
        return 0, self.meta.layout.tp

    def tensors(self, meta: bool = False, only: Sequence[Conversion] | None = None) -> Iterator[tuple[Conversion, torch.Tensor]]:
        vocab = self.meta.config.vocab_size
        for conv in self.conversions if only is None else only:
            loc, rule = self._local(conv.megatron), rule_for(conv.megatron)
            ep_rank, n = self._shards(conv.megatron, loc)
            if meta:
                shards = [self.reader.meta(r, loc.pp_rank, loc.chunk, loc.name, ep_rank) for r in range(n)]
                yield conv, shards[0] if rule is Split.REPLICATED else gather(shards, rule, vocab)
                continue
            if rule in (Split.COLUMN, Split.VOCAB, Split.GATED_COLUMN):
                out = self._gather_in_place(loc, rule, ep_rank, n)
                yield conv, out[:vocab] if rule is Split.VOCAB else out
            else:
                yield conv, gather([self.reader.get(r, loc.pp_rank, loc.chunk, loc.name, ep_rank) for r in range(n)], rule, vocab)
            self._mark_copies(loc, ep_rank, n)

    def _mark_copies(self, loc: LocalKey, ep_rank: int, n: int) -> None:
        """The copies a layout repeats (dense weights in every EP rank's file, expert shards when ETP < TP)."""
        for e in _ep_ranks(loc, self.meta.layout):
            for t in range(self.meta.layout.tp):
                if e != ep_rank or t >= n:  # not one of the n shards read from `ep_rank`
                    self.reader.mark_consumed(t, loc.pp_rank, loc.chunk, loc.name, e)

    def _gather_in_place(self, loc: LocalKey, rule: Split, ep_rank: int, n: int) -> torch.Tensor:
        """Dim-0 splits: read every shard straight into its rows of the global tensor (no read + cat)."""
        metas = [self.reader.meta(r, loc.pp_rank, loc.chunk, loc.name, ep_rank) for r in range(n)]
        rows = metas[0].shape[0]
        out = torch.empty(rows * len(metas), *metas[0].shape[1:], dtype=metas[0].dtype)
        if rule is not Split.GATED_COLUMN:
            for r in range(len(metas)):
                self.reader.get_into(r, loc.pp_rank, loc.chunk, loc.name, out[r * rows:(r + 1) * rows], ep_rank=ep_rank)
            return out
        half, total_half = rows // 2, rows * len(metas) // 2  # each shard is [gate_r; up_r]
        per_row = metas[0][0].numel()
        for r in range(len(metas)):
            self.reader.get_into(r, loc.pp_rank, loc.chunk, loc.name, out[r * half:(r + 1) * half], ep_rank=ep_rank)
            self.reader.get_into(r, loc.pp_rank, loc.chunk, loc.name, out[total_half + r * half:total_half + (r + 1) * half],
                                 first=half * per_row, ep_rank=ep_rank)
        return out

    def finish(self) -> None:
        check_leftover([self.leftover()])

    def share_report(self) -> list[str]:
        """What one process of a conversion over several reports for the whole-model check: what it left unread."""
        return self.leftover()

    def finish_shares(self, reports: Sequence[list[str]]) -> None:
        check_leftover(reports)

    def leftover(self) -> list[str]:
        """What was not read, once the entries without weights of their own are checked and counted as read: in a
        conversion over several processes, a tensor is left over when every process left it."""
        for loc in self._extra_keys():
            for e in _ep_ranks(loc, self.meta.layout):
                for tp_rank in range(self.meta.layout.tp):
                    if loc.name == "output_layer.weight" and e == 0:
                        self._check_tied_copy(tp_rank, loc.pp_rank, loc.chunk)
                    self.reader.mark_consumed(tp_rank, loc.pp_rank, loc.chunk, loc.name, e)
        return self.reader.unconsumed()

    def _check_tied_copy(self, tp_rank: int, pp_rank: int, chunk: int) -> None:
        head = self.reader.get(tp_rank, pp_rank, chunk, "output_layer.weight")
        embedding = self.reader.get(tp_rank, 0, 0, "embedding.word_embeddings.weight")
        if not torch.equal(head, embedding):
            raise BridgeError(f"tied embeddings: output_layer.weight on the last stage (tp rank {tp_rank}) differs from "
                              "the embedding; the checkpoint was not kept in sync")


class MegatronSink:
    """Global Megatron tensors -> per-rank shards -> Megatron legacy files."""

    def __init__(self, root: Path, meta: CheckpointMeta, args: Callable[[int, int], argparse.Namespace],
                 writer: LegacyCheckpointWriter | None = None) -> None:
        """`writer` replaces the rank files (e.g. torch_dist's in-memory collector of one rank's shard)."""
        self.meta = meta
        self.writer = writer or LegacyCheckpointWriter(root, meta.layout, args)
        self._module: str | None = None
        self._finished: set[str] = set()

    def put(self, conv: Conversion, tensor: torch.Tensor) -> None:
        module = conv.megatron.rsplit(".", 1)[0]
        if module != self._module:
            self._flush_extra_state()
            if module in self._finished:  # its _extra_state is written: a family's rows must keep a module together
                raise RuntimeError(f"mapping rows of {module} are not consecutive ({conv.megatron} comes after "
                                   "another module's rows); order the family's rows by module")
            self._finished.add(module)
            self._module = module
        cfg, layout = self.meta.config, self.meta.layout
        self._write(conv.megatron, tensor)
        if conv.megatron == "embedding.word_embeddings.weight" and cfg.tie_word_embeddings and layout.pp > 1:
            self._write("output_layer.weight", tensor)  # Megatron keeps a copy on the last stage

    def _local(self, key: str) -> LocalKey:
        return _localize(self.meta, key)

    def _add(self, tp_rank: int, loc: LocalKey, ep_rank: int, tensor: torch.Tensor) -> None:
        self.writer.add(tp_rank, loc.pp_rank, loc.chunk, loc.name, tensor, ep_rank=ep_rank)

    def _write(self, key: str, tensor: torch.Tensor) -> None:
        """Experts: ETP shards into their EP rank's files (TP rank t holds shard t % ETP); the rest: TP
        shards into every EP rank's files."""
        layout, loc = self.meta.layout, self._local(key)
        if is_expert_key(key):
            shards = split(tensor, rule_for(key), layout.expert_tp, self.meta.padded_vocab_size)
            for tp_rank in range(layout.tp):
                self._add(tp_rank, loc, loc.ep_rank or 0, shards[tp_rank % layout.expert_tp])
            return
        shards = split(tensor, rule_for(key), layout.tp, self.meta.padded_vocab_size)
        for ep_rank in range(layout.ep):
            for tp_rank, shard in enumerate(shards):
                self._add(tp_rank, loc, ep_rank, shard)

    def _flush_extra_state(self) -> None:
        """After a TE module's weights: its `_extra_state`, an empty uint8 tensor without FP8 (TE 2.x).

        `core_attention` has no weights; its entry follows `linear_qkv`'s (or MLA's `linear_kv_up_proj`'s).
        """
        if self._module is None or self.meta.transformer_impl != "transformer_engine":
            return
        for key in extra_state_keys(self._module, self.meta.layout, self.meta.config.num_experts):
            loc = self._local(key)
            for ep_rank in _ep_ranks(loc, self.meta.layout):
                for tp_rank in range(self.meta.layout.tp):
                    self._add(tp_rank, loc, ep_rank, torch.empty(0, dtype=torch.uint8))

    def close(self) -> None:
        self._flush_extra_state()
        self.writer.close()


class _ByteCounter:
    """Stands in for the rank-file writer to total what a sink would write."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, tp_rank: int, pp_rank: int, chunk: int, name: str, tensor: torch.Tensor, ep_rank: int = 0) -> None:
        self.total += tensor.nbytes + PER_TENSOR_OVERHEAD

    def close(self) -> None:
        pass


def megatron_bytes(source: Source, meta: CheckpointMeta) -> int:
    """Bytes a Megatron output will take: the sink's own placement (copies, padding) run on `meta` tensors.

    torch_dist holds each global tensor once, with the vocabulary padded as for the layout's TP: what the rank
    file of a TP=PP=1 layout with the same padding holds.
    """
    if meta.format == "torch_dist":
        multiple = meta.layout.make_vocab_size_divisible_by * meta.layout.tp
        meta = replace(meta, layout=ParallelLayout(make_vocab_size_divisible_by=multiple))
    counter = _ByteCounter()
    sink = MegatronSink(Path(), meta, lambda tp_rank, pp_rank: argparse.Namespace(), writer=counter)
    for conv, tensor in source.tensors(meta=True):
        sink.put(conv, tensor)
    sink.close()
    return counter.total


def hf_plan(source: Source, cfg: ModelConfig, dtype: torch.dtype | None) -> list[PlannedTensor]:
    """Name, dtype and shape of every HF tensor an export writes, from the source's metadata (no data); a stacked
    tensor once, with every expert."""
    plan: dict[str, PlannedTensor] = {}
    for conv, tensor in source.tensors(meta=True):
        stack = () if conv.hf_index is None else (cfg.num_experts,)
        for name, t in zip(conv.hf, conv.to_hf(tensor, cfg)):
            plan.setdefault(name, PlannedTensor(name, dtype or t.dtype, (*stack, *t.shape)))
    return list(plan.values())


def hf_bytes(source: Source, cfg: ModelConfig, dtype: torch.dtype | None) -> int:
    """Bytes the safetensors shards of an export will take."""
    return sum(p.nbytes + PER_TENSOR_OVERHEAD for p in hf_plan(source, cfg, dtype))


class HFSink:
    """Global Megatron tensors -> HF tensors (inverse mapping) -> streamed safetensors shards."""

    def __init__(self, folder: Path, cfg: ModelConfig, source: Source, dtype: torch.dtype | None, max_shard_size: int,
                 writer: StreamingSafetensorsWriter | None = None) -> None:
        """`writer`: one process's shard files, in a conversion over several."""
        self.cfg, self.dtype = cfg, dtype
        self.writer = writer or StreamingSafetensorsWriter(folder, hf_plan(source, cfg, dtype), max_shard_size)

    def put(self, conv: Conversion, tensor: torch.Tensor) -> None:
        for name, hf_tensor in zip(conv.hf, conv.to_hf(tensor, self.cfg)):
            self.writer.write(name, hf_tensor if self.dtype is None else hf_tensor.to(self.dtype), conv.hf_index)

    def close(self) -> None:
        self.writer.close()


def run(source: Source, sink: Sink, total: int, description: str) -> None:
    """Stream every tensor from source to sink; then both sides check that nothing was left over."""
    return_large_buffers_to_os()
    # disable=None: a bar only on a terminal; a log file would fill with its carriage-return redraws
    for conv, tensor in tqdm(source.tensors(), total=total, desc=description, unit="tensor", leave=False, disable=None):
        sink.put(conv, tensor)
        del tensor
    source.finish()
    sink.close()
