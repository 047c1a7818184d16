"""Architecture-agnostic TP sharding rules keyed by Megatron parameter kind, and pipeline placement of keys."""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import torch

from bridge.errors import BridgeError
from bridge.layout import ParallelLayout


class Split(enum.Enum):
    COLUMN = "column"          # split dim 0
    ROW = "row"                # split dim 1
    VOCAB = "vocab"            # pad rows to the padded vocab, then split dim 0
    GATED_COLUMN = "gated"     # [gate; up]: each rank gets [gate_r; up_r]
    REPLICATED = "replicated"


#: Parameter kind (the key's tail) -> how TP splits it. Longest matching tail wins.
RULES: dict[str, Split] = {
    "word_embeddings.weight": Split.VOCAB,
    "output_layer.weight": Split.VOCAB,
    "linear_qkv.weight": Split.COLUMN,
    "linear_qkv.bias": Split.COLUMN,
    "linear_proj.weight": Split.ROW,
    "linear_fc1.weight": Split.GATED_COLUMN,
    "linear_fc2.weight": Split.ROW,
    "layer_norm_weight": Split.REPLICATED,
    "layernorm.weight": Split.REPLICATED,
    "q_layernorm.weight": Split.REPLICATED,
    "k_layernorm.weight": Split.REPLICATED,
    "final_layernorm.weight": Split.REPLICATED,
}


def rule_for(key: str) -> Split:
    for tail in sorted(RULES, key=len, reverse=True):
        if key.endswith(tail):
            return RULES[tail]
    raise BridgeError(f"no sharding rule for Megatron parameter {key}; bridge does not know how TP splits it")


def split(tensor: torch.Tensor, rule: Split, tp: int, padded_vocab: int) -> list[torch.Tensor]:
    """One global tensor -> `tp` contiguous shards, in TP-rank order."""
    if rule is Split.REPLICATED:
        return [tensor] * tp
    if rule is Split.VOCAB:
        pad = padded_vocab - tensor.shape[0]
        if pad < 0:
            raise BridgeError(f"vocabulary of {tensor.shape[0]} rows exceeds the padded size {padded_vocab}")
        if pad:
            tensor = torch.cat([tensor, tensor.new_zeros(pad, *tensor.shape[1:])])
        return [s.contiguous() for s in tensor.chunk(tp, dim=0)]
    if rule is Split.GATED_COLUMN:
        gate, up = tensor.chunk(2, dim=0)
        return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
    dim = 0 if rule is Split.COLUMN else 1
    return [s.contiguous() for s in tensor.chunk(tp, dim=dim)]


def gather(shards: list[torch.Tensor], rule: Split, vocab_size: int) -> torch.Tensor:
    """Inverse of `split`: TP shards -> the global tensor (vocab padding trimmed)."""
    if rule is Split.REPLICATED:
        first = shards[0]
        for rank, other in enumerate(shards[1:], start=1):
            if not torch.equal(first, other):
                raise BridgeError(f"replicated tensor differs between TP rank 0 and TP rank {rank}; the checkpoint is inconsistent")
        return first
    if rule is Split.VOCAB:
        return torch.cat(shards, dim=0)[:vocab_size]
    if rule is Split.GATED_COLUMN:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0 if rule is Split.COLUMN else 1)


def shard_shape(shape: torch.Size, rule: Split, tp: int, padded_vocab: int) -> tuple[int, ...]:
    """Shape of one rank's shard, without touching data."""
    dims = list(shape)
    if rule is Split.VOCAB:
        dims[0] = padded_vocab // tp
    elif rule in (Split.COLUMN, Split.GATED_COLUMN):
        dims[0] //= tp
    elif rule is Split.ROW:
        dims[1] //= tp
    return tuple(dims)


#: TE-spec names that the local spec spells differently (megatron/core/models/gpt/gpt_layer_specs.py).
LOCAL_SPEC_RENAMES: dict[str, str] = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

#: Transformer Engine modules that carry an `_extra_state` entry in the TE spec (empty uint8 without FP8).
TE_EXTRA_STATE_MODULES: tuple[str, ...] = (
    "self_attention.linear_qkv",
    "self_attention.core_attention",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class LocalKey:
    """Where a global Megatron key lands: pipeline stage, virtual chunk, and the stage-local name."""

    pp_rank: int
    chunk: int
    name: str


def localize(key: str, layout: ParallelLayout, num_layers: int, transformer_impl: str) -> LocalKey:
    """Global key (global layer index, TE names) -> stage, chunk and the name written in that file."""
    match = _LAYER.match(key)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        if transformer_impl == "local":
            rest = LOCAL_SPEC_RENAMES.get(rest, rest)
        place = layout.place(layer, num_layers)
        return LocalKey(place.pp_rank, place.chunk, f"decoder.layers.{place.local_index}.{rest}")
    if key.startswith("embedding."):
        return LocalKey(0, 0, key)
    return LocalKey(layout.pp - 1, layout.chunks - 1, key)


def globalize(name: str, pp_rank: int, chunk: int, layout: ParallelLayout, num_layers: int) -> str:
    """Inverse of `localize`: a stage-local name (either spec) -> the global TE-spec key."""
    match = _LAYER.match(name)
    if not match:
        return name
    local, rest = int(match.group(1)), match.group(2)
    for te_name, local_name in LOCAL_SPEC_RENAMES.items():
        if rest == local_name:
            rest = te_name
    return f"decoder.layers.{layout.global_layer(pp_rank, chunk, local, num_layers)}.{rest}"
