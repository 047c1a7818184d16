"""HF-named weights in and out of a live parallel model, one tensor at a time (RL weight sync, save from memory).

Every rank of the job calls these functions together: they run collectives over the TP and PP
groups. Loading reads from disk only the HF tensors the rank's stage owns; streaming out gathers
one Megatron tensor at a time over TP, moves it from its pipeline stage with a broadcast, and
yields its HF pieces, so a rank never holds more than one full tensor plus its shards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection, Iterator, Sequence

import torch
import torch.distributed as dist

from bridge.checkpoint import atomic_output_dir, copy_hf_meta, set_config_dtype
from bridge.config import ModelConfig
from bridge.converters.engine import HFSource
from bridge.converters.hf import PlannedTensor, SafetensorsReader, StreamingSafetensorsWriter, parse_size
from bridge.errors import BridgeError
from bridge.hub import load_pretrained
from bridge.mapping import Conversion
from bridge.models import conversions, mtp
from bridge.nn.gpt import GPTModel
from bridge.sharding import LocalKey, Split, gather, localize, rule_for, split

DESTINATIONS = ("all", "rank0")


def _locate(key: str, model: GPTModel) -> LocalKey:
    """Stage, chunk, EP rank (experts only) and local name of a global Megatron key in this model."""
    cfg = model.cfg
    return localize(key, model.ps.layout, cfg.num_layers, model.transformer_impl, cfg.num_experts)


def _owns(loc: LocalKey, ps: object) -> bool:
    """Whether this rank holds (its TP shard of) the key: right stage, and right EP rank for an expert."""
    return loc.pp_rank == ps.pp_rank and (loc.ep_rank is None or loc.ep_rank == getattr(ps, "ep_rank", 0))


def _chunk_states(chunks: Sequence[GPTModel]) -> list[dict[str, torch.Tensor]]:
    """Each chunk's parameters by local name, taken once per call (a state_dict walks every module)."""
    return [chunk.state_dict(keep_vars=True) for chunk in chunks]


def _local_tensor(states: Sequence[dict[str, torch.Tensor]], chunk: int, name: str) -> torch.Tensor:
    state = states[chunk]
    if name not in state:
        raise BridgeError(f"chunk {chunk} has no parameter {name}; was the model built with another transformer_impl?")
    return state[name]


def load_hf_weights(chunks: Sequence[GPTModel], folder: Path) -> None:
    """Fill this rank's chunks from an HF folder: read, map, shard, keep this rank's piece. Strict:
    every parameter is written exactly once, or the error lists the ones that were not."""
    model = chunks[0]
    reader = SafetensorsReader(folder)
    cfg, ps, layout = mtp.as_stored(model.cfg, reader.names()), model.ps, model.ps.layout
    convs = conversions(cfg)
    source = HFSource(reader, cfg, convs, dtype=None)  # checks the folder against the mapping first
    written: set[tuple[int, str]] = set()
    padded = layout.padded_vocab_size(cfg.vocab_size)
    states = _chunk_states(chunks)

    def put(key: str, tensor: torch.Tensor) -> None:
        loc = _locate(key, model)
        if not _owns(loc, ps):
            return
        shard = split(tensor, rule_for(key), ps.tp, padded)[ps.tp_rank]
        with torch.no_grad():
            _local_tensor(states, loc.chunk, loc.name).copy_(shard)
        written.add((loc.chunk, loc.name))

    for conv in convs:
        loc = _locate(conv.megatron, model)
        tied_head = conv.megatron == "embedding.word_embeddings.weight" and cfg.tie_word_embeddings and ps.pp > 1
        if not _owns(loc, ps) and not (tied_head and ps.is_last_stage):
            continue  # another stage's (or EP rank's) tensor: not even read
        tensor = conv.to_megatron([source.read(n, conv.hf_index) for n in conv.hf], cfg)
        put(conv.megatron, tensor)
        if tied_head:
            put("output_layer.weight", tensor)
    source.finish()
    expected = {(v, n) for v, m in enumerate(chunks) for n, _ in m.named_parameters()}
    missing = sorted(f"chunk{v}:{n}" for v, n in expected - written)
    if missing:
        raise BridgeError(f"{len(missing)} parameters were not loaded from {folder}: {', '.join(missing[:10])}")


def _gather_tp(local: torch.Tensor, rule: Split, model: GPTModel) -> torch.Tensor:
    """The full tensor from this TP group's shards.

    One broadcast per TP rank, each straight into the shard's place: gloo's all_gather would stage a
    second full-size buffer of its own, and the memory bound is one full tensor plus its shards.
    """
    ps = model.ps
    local = local.detach()
    if rule is Split.REPLICATED or ps.tp == 1:
        return local[: model.cfg.vocab_size] if rule is Split.VOCAB else local
    if rule in (Split.COLUMN, Split.VOCAB):  # dim-0 shards: gather into the rows of the full tensor
        full = local.new_empty((ps.tp * local.shape[0], *local.shape[1:]))
        parts = list(full.chunk(ps.tp))
        parts[ps.tp_rank].copy_(local)
    else:
        parts = [local.contiguous() if r == ps.tp_rank else torch.empty_like(local) for r in range(ps.tp)]
    for r, part in enumerate(parts):
        dist.broadcast(part, src=ps.tp_ranks[r], group=ps.tp_group)
    if rule in (Split.COLUMN, Split.VOCAB):
        return full[: model.cfg.vocab_size] if rule is Split.VOCAB else full
    return gather(parts, rule, model.cfg.vocab_size)


def _broadcast(tensor: torch.Tensor | None, src: int, group: object, model: GPTModel) -> torch.Tensor:
    """Broadcast from global rank `src`; receivers learn the shape and dtype first."""
    meta = [(tuple(tensor.shape), tensor.dtype) if tensor is not None else None]
    dist.broadcast_object_list(meta, src=src, group=group)
    shape, dtype = meta[0]
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=next(model.parameters()).device)
    dist.broadcast(tensor.contiguous(), src=src, group=group)
    return tensor


def _from_stage(tensor: torch.Tensor | None, owner_stage: int, model: GPTModel) -> torch.Tensor:
    """Move a tensor from the pipeline stage that owns it to every stage of this pipeline."""
    ps = model.ps
    return tensor if ps.pp == 1 else _broadcast(tensor, ps.pp_ranks[owner_stage], ps.pp_group, model)


def _from_ep_rank(tensor: torch.Tensor | None, owner: int, model: GPTModel) -> torch.Tensor:
    """Move an expert's full tensor from the EP rank that holds the expert to the rest of its EP group."""
    ps = model.ps
    if ps.layout.ep == 1:
        return tensor
    return _broadcast(tensor, ps.ep_peer(owner), ps.ep_group, model)


def export_hf_weights(chunks: Sequence[GPTModel], *, names: Collection[str] | None = None,
                      dtype: torch.dtype | None = None, to: str = "all") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for every HF weight (or those in `names`), each exactly once.

    `to="all"`: every rank receives every tensor; `to="rank0"`: only global rank 0 does (the others
    still iterate the generator to take part in the collectives, and get nothing). All ranks must
    pass the same arguments.
    """
    if to not in DESTINATIONS:
        raise BridgeError(f"to={to!r} is not one of {', '.join(DESTINATIONS)}")
    model = chunks[0]
    cfg, ps = model.cfg, model.ps
    convs = conversions(model.cfg)
    if any(conv.hf_index is not None for conv in convs):
        raise BridgeError(f"{cfg.architecture} keeps each layer's experts in one HF tensor, which streaming one "
                          "Megatron tensor at a time does not assemble; save a checkpoint and `bridge export` it")
    wanted = set(names) if names is not None else None
    if wanted is not None:
        unknown = wanted - {n for c in convs for n in c.hf}
        if unknown:
            raise BridgeError(f"unknown HF weight names: {', '.join(sorted(unknown)[:10])}")
    receive = to == "all" or ps.rank == 0
    states = _chunk_states(chunks)
    for conv in convs:
        if wanted is not None and not wanted.intersection(conv.hf):
            continue
        loc = _locate(conv.megatron, model)
        full = None
        if _owns(loc, ps):
            full = _gather_tp(_local_tensor(states, loc.chunk, loc.name), rule_for(conv.megatron), model)
        if loc.ep_rank is not None and loc.pp_rank == ps.pp_rank:
            full = _from_ep_rank(full, loc.ep_rank, model)
        full = _from_stage(full, loc.pp_rank, model)
        if receive:
            yield from _hf_pieces(conv, full, cfg, wanted, dtype)
        del full


def _hf_pieces(conv: Conversion, full: torch.Tensor, cfg: ModelConfig, wanted: set[str] | None,
               dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of one Megatron tensor. A separate generator so that no loop variable keeps the
    previous tensor alive while the next one is gathered."""
    for name, tensor in zip(conv.hf, conv.to_hf(full, cfg)):
        if wanted is None or name in wanted:
            yield name, tensor if dtype is None else tensor.to(dtype)


def _hf_plan(model: GPTModel, hf_folder: Path, dtype: torch.dtype | None) -> list:
    """HF names, shapes and dtypes of the weights, from transformers' model on the meta device (no data)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # imported here: transformers takes seconds to import

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(load_pretrained(AutoConfig, hf_folder))
    shapes = {name: tuple(t.shape) for name, t in hf.state_dict().items()}
    param_dtype = next(model.parameters()).dtype
    return [PlannedTensor(name, dtype or param_dtype, shapes[name]) for conv in conversions(model.cfg) for name in conv.hf]


def save_hf(chunks: Sequence[GPTModel], hf_folder: Path, out: Path, *, dtype: torch.dtype | None,
            max_shard_size: str, overwrite: bool) -> Path | None:
    """Gather the live model to rank 0 and stream it into an HF folder (config and tokenizer from `hf_folder`)."""
    model = chunks[0]
    is_writer = model.ps.rank == 0
    stream = export_hf_weights(chunks, dtype=dtype, to="rank0")
    if not is_writer:
        for _ in stream:
            pass
        dist.barrier()
        return None
    with atomic_output_dir(out, overwrite) as tmp:
        writer = StreamingSafetensorsWriter(tmp, _hf_plan(model, hf_folder, dtype), parse_size(max_shard_size))
        for name, tensor in stream:
            writer.write(name, tensor)
        writer.close()
        copy_hf_meta(hf_folder, tmp)
        set_config_dtype(tmp / "config.json", dtype or next(model.parameters()).dtype)
    dist.barrier()
    return out
