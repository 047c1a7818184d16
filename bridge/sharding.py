"""TP split and gather of a global tensor by its parameter kind (declared in bridge.params), and where a global key
lands: pipeline stage, virtual chunk, EP rank and the name written in that file."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from bridge.params import LOCAL_NAMES, TE_EXTRA, Split, kind_of

__all__ = ["Split", "LocalKey", "rule_for", "split", "gather", "localize", "extra_state_keys", "is_expert_key",
           "is_mtp_key"]


def rule_for(key: str) -> Split:
    """How TP splits the parameter `key` (any spelling bridge.params.kind_of takes)."""
    return kind_of(key).split


def split(tensor: torch.Tensor, rule: Split, tp: int, padded_vocab: int) -> list[torch.Tensor]:
    """One global tensor -> `tp` contiguous shards, in TP-rank order."""
    if rule is Split.REPLICATED:
        return [tensor] * tp
    if rule is Split.VOCAB:
        pad = padded_vocab - tensor.shape[0]
        if pad < 0:
            raise BridgeError(f"vocabulary of {tensor.shape[0]} rows exceeds the padded size {padded_vocab}")
        if pad:
            tensor = torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, pad))
        return [s.contiguous() for s in tensor.chunk(tp, dim=0)]
    if rule is Split.GATED_COLUMN:
        # rank t holds its rows of gate, then its rows of up: one reordering copy serves every rank (views of it),
        # where a torch.cat per rank would cost as much and, on `meta`, import torch._dynamo
        rows = tensor.shape[0] // (2 * tp)
        gated = tensor.reshape(2, tp, rows, *tensor.shape[1:]).transpose(0, 1).contiguous()
        return [s.flatten(0, 1) for s in gated]
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


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
#: An MTP layer's transformer layer (Megatron Core builds the MTP block on the last stage, in its last virtual chunk)
#: and an MTP layer's own modules (enorm, hnorm, eh_proj, final_layernorm).
_MTP_LAYER = re.compile(r"^(mtp\.layers\.\d+\.transformer_layer)\.(.*)$")
_MTP_MODULE = re.compile(r"^(mtp\.layers\.\d+)\.([^.]+)$")
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


def is_mtp_key(key: str) -> bool:
    """A multi-token prediction layer's tensor (ModelConfig.mtp_layers): converted and carried, never run."""
    return key.startswith("mtp.")


def localize(key: str, layout: ParallelLayout, num_layers: int, transformer_impl: str, num_experts: int = 0) -> LocalKey:
    """Global key (global layer/expert index, TE names) -> stage, chunk, EP rank and the name written in that file.
    MTP layers go to the last stage's last chunk, where Megatron Core builds its MTP block."""
    match = _LAYER.match(key)
    if match:
        rest, ep_rank = _layer_local(key, match.group(2), layout, transformer_impl, num_experts)
        place = layout.place(int(match.group(1)), num_layers)
        return LocalKey(place.pp_rank, place.chunk, f"decoder.layers.{place.local_index}.{rest}", ep_rank)
    if key.startswith("embedding."):
        return LocalKey(0, 0, key)
    match = _MTP_LAYER.match(key)
    if match:
        rest, ep_rank = _layer_local(key, match.group(2), layout, transformer_impl, num_experts)
        return LocalKey(layout.pp - 1, layout.chunks - 1, f"{match.group(1)}.{rest}", ep_rank)
    return LocalKey(layout.pp - 1, layout.chunks - 1, key)


def _layer_local(key: str, rest: str, layout: ParallelLayout, transformer_impl: str,
                 num_experts: int) -> tuple[str, int | None]:
    """A layer-relative name as its file holds it (local-spec names, an expert's EP-local name) and its EP rank."""
    if transformer_impl == "local":
        rest = LOCAL_NAMES.get(rest, rest)
    expert = _EXPERT.match(rest)
    if not expert:
        return rest, None
    if num_experts <= 0:
        raise BridgeError(f"internal: expert key {key} localized without the number of experts")
    ep_rank, local = layout.expert_place(int(expert.group(1)), num_experts)
    module, kind = expert.group(2), expert.group(3)
    rest = (f"mlp.experts.{module}.{kind}{local}" if layout.moe_grouped_gemm and kind != "_extra_state"
            else f"mlp.experts.{module}._extra_state" if layout.moe_grouped_gemm
            else f"mlp.experts.local_experts.{local}.{module}.{kind}")
    return rest, ep_rank


def extra_state_keys(module: str, layout: ParallelLayout, num_experts: int = 0) -> list[str]:
    """Global `_extra_state` keys that follow the weights of `module` (e.g. `decoder.layers.3.mlp.linear_fc1`)
    in the TE spec. Grouped experts have one entry per EP rank's module: emitted with local expert 0."""
    own = _MTP_MODULE.match(module)
    if own:  # an MTP layer's own TE module
        return [f"{own.group(1)}.{entry}._extra_state" for entry in TE_EXTRA.get(f"mtp.{own.group(2)}", ())]
    match = _LAYER.match(module)
    if match:
        prefix, rest = f"decoder.layers.{match.group(1)}", match.group(2)
    elif (match := _MTP_LAYER.match(module)):
        prefix, rest = match.group(1), match.group(2)
    else:
        return []
    expert = _LOCAL_EXPERT.match(rest)
    if expert:
        if layout.moe_grouped_gemm and layout.expert_place(int(expert.group(1)), num_experts)[1] != 0:
            return []
        return [f"{module}._extra_state"]
    return [f"{prefix}.{entry}._extra_state" for entry in TE_EXTRA.get(rest, ())]
