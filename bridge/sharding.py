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
    # MoE: the router and the shared-expert gate are replicated; expert fc1/fc2 use the fc1/fc2 rules
    # above, split over the expert-TP group (`etp`) instead of TP.
    "router.weight": Split.REPLICATED,
    "router.expert_bias": Split.REPLICATED,
    "shared_experts.gate_weight": Split.REPLICATED,
    # MLA (TE spec): down-projections are duplicated TELinear; up-projections column parallel.
    "linear_q_proj.weight": Split.COLUMN,
    "linear_q_down_proj.weight": Split.REPLICATED,
    "linear_kv_down_proj.weight": Split.REPLICATED,
    "linear_q_up_proj.weight": Split.COLUMN,
    "linear_kv_up_proj.weight": Split.COLUMN,
}


#: RULES' tails, longest first, so that a specific tail wins over a shorter one it ends with.
_TAILS = sorted(RULES, key=len, reverse=True)


def rule_for(key: str) -> Split:
    for tail in _TAILS:
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


#: TE-spec names that the local spec spells differently (megatron/core/models/gpt/gpt_layer_specs.py).
LOCAL_SPEC_RENAMES: dict[str, str] = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
#: Global expert keys use SequentialMLP's names with the *global* expert index (like the global layer index).
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias|_extra_state)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class LocalKey:
    """Where a global Megatron key lands: pipeline stage, virtual chunk, the stage-local name, and the
    EP rank for expert weights (None: the key is in every EP rank's file)."""

    pp_rank: int
    chunk: int
    name: str
    ep_rank: int | None = None


def is_expert_key(key: str) -> bool:
    """A routed expert's weight: split over the expert-TP group and placed on one EP rank."""
    return ".mlp.experts.local_experts." in key


def localize(key: str, layout: ParallelLayout, num_layers: int, transformer_impl: str, num_experts: int = 0) -> LocalKey:
    """Global key (global layer/expert index, TE names) -> stage, chunk, EP rank and the name written in that file."""
    match = _LAYER.match(key)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        ep_rank = None
        if transformer_impl == "local":
            rest = LOCAL_SPEC_RENAMES.get(rest, rest)
        expert = _EXPERT.match(rest)
        if expert:
            if num_experts <= 0:
                raise BridgeError(f"internal: expert key {key} localized without the number of experts")
            ep_rank, local = layout.expert_place(int(expert.group(1)), num_experts)
            module, kind = expert.group(2), expert.group(3)
            rest = (f"mlp.experts.{module}.{kind}{local}" if layout.moe_grouped_gemm and kind != "_extra_state"
                    else f"mlp.experts.{module}._extra_state" if layout.moe_grouped_gemm
                    else f"mlp.experts.local_experts.{local}.{module}.{kind}")
        place = layout.place(layer, num_layers)
        return LocalKey(place.pp_rank, place.chunk, f"decoder.layers.{place.local_index}.{rest}", ep_rank)
    if key.startswith("embedding."):
        return LocalKey(0, 0, key)
    return LocalKey(layout.pp - 1, layout.chunks - 1, key)


#: TE modules (relative to a layer) whose weights are followed by `_extra_state` entries: module -> entries.
_TE_EXTRA_AFTER: dict[str, tuple[str, ...]] = {
    "self_attention.linear_qkv": ("self_attention.linear_qkv", "self_attention.core_attention"),
    "self_attention.linear_proj": ("self_attention.linear_proj",),
    "mlp.linear_fc1": ("mlp.linear_fc1",),
    "mlp.linear_fc2": ("mlp.linear_fc2",),
    "input_layernorm": ("input_layernorm",),          # TENorm: MLA layers
    "pre_mlp_layernorm": ("pre_mlp_layernorm",),      # TENorm: MoE layers
    "mlp.shared_experts.linear_fc1": ("mlp.shared_experts.linear_fc1",),
    "mlp.shared_experts.linear_fc2": ("mlp.shared_experts.linear_fc2",),
    "self_attention.linear_q_proj": ("self_attention.linear_q_proj",),
    "self_attention.linear_q_down_proj": ("self_attention.linear_q_down_proj",),
    "self_attention.linear_q_up_proj": ("self_attention.linear_q_up_proj",),
    "self_attention.linear_kv_down_proj": ("self_attention.linear_kv_down_proj",),
    "self_attention.linear_kv_up_proj": ("self_attention.linear_kv_up_proj", "self_attention.core_attention"),
}


def extra_state_keys(module: str, layout: ParallelLayout, num_experts: int = 0) -> list[str]:
    """Global `_extra_state` keys that follow the weights of `module` (e.g. `decoder.layers.3.mlp.linear_fc1`)
    in the TE spec. Grouped experts have one entry per EP rank's module: emitted with local expert 0."""
    match = _LAYER.match(module)
    if not match:
        return []
    prefix, rest = f"decoder.layers.{match.group(1)}", match.group(2)
    expert = _LOCAL_EXPERT.match(rest)
    if expert:
        if layout.moe_grouped_gemm and layout.expert_place(int(expert.group(1)), num_experts)[1] != 0:
            return []
        return [f"{module}._extra_state"]
    return [f"{prefix}.{entry}._extra_state" for entry in _TE_EXTRA_AFTER.get(rest, ())]
