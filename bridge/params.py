"""Every Megatron parameter kind, declared once: how TP splits it, whether its gradient is partial, its global shape,
the TE `_extra_state` entries that follow it, its local-spec name and the Megatron-Bridge mapping that converts it.

Conversion (bridge.sharding, bridge.mapping, the converters) and the model (bridge.nn, the trainer's gradient
buffer) read the same table, so a kind cannot be split one way on disk and reduced another way in training. A kind
is named by its TE-spec key without the layer and expert indexes (`self_attention.linear_qkv.weight`,
`mlp.experts.linear_fc1.weight`, `output_layer.weight`); `kind_of` takes any key the files or the model use:
global or stage-local layer index, TE or local spec, SequentialMLP or grouped-GEMM experts.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Callable

from bridge.config import ModelConfig
from bridge.errors import BridgeError


class Split(enum.Enum):
    """How tensor parallelism cuts a global tensor into per-rank shards."""

    COLUMN = "column"          # split dim 0
    ROW = "row"                # split dim 1
    VOCAB = "vocab"            # pad rows to the padded vocab, then split dim 0
    GATED_COLUMN = "gated"     # [gate; up]: each rank gets [gate_r; up_r]
    REPLICATED = "replicated"


class Partial(enum.Enum):
    """Whether a replicated parameter's gradient on one TP rank covers all of the data, and when it must be summed
    over TP (Megatron's finalize_model_grads)."""

    NO = "no"                  # split over TP, or complete on every rank: nothing to sum
    SEQUENCE = "sequence"      # outside the TP regions: with sequence parallelism each rank sees its sequence shard
    HEADS = "heads"            # applied per head (q/k norms): each rank sees only its own heads, always summed


Shape = Callable[[ModelConfig], tuple[int, ...]]


@dataclass(frozen=True)
class ParamKind:
    """One Megatron parameter kind. `te_extra` is set on one kind of a TE module (its weight): the modules, relative
    to the layer, whose `_extra_state` entries follow that module's tensors in a TE-spec state dict."""

    name: str
    split: Split
    shape: Shape
    megatron_bridge: str
    """The Megatron-Bridge mapping that converts this kind (param_mapping.py; AutoMapping with the parallelism type
    it reads from the module), so a Megatron-Bridge user can tell how the same tensor is handled there."""
    partial: Partial = Partial.NO
    te_extra: tuple[str, ...] = ()
    local: str | None = None
    """The key in Megatron's local spec (gpt_layer_specs.py) where it differs from the TE spec's: the norms that TE
    fuses into the next linear layer are modules of their own there."""

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


def _h(cfg: ModelConfig) -> tuple[int, ...]:
    return (cfg.hidden_size,)


def _mla_q_rows(cfg: ModelConfig) -> int:
    return cfg.num_attention_heads * (cfg.mla.qk_head_dim + cfg.mla.qk_pos_emb_head_dim)


def _proj_cols(cfg: ModelConfig) -> int:
    return cfg.num_attention_heads * (cfg.mla.v_head_dim if cfg.mla else cfg.kv_channels)


def _qk_norm(heads: Callable[[ModelConfig], int]) -> Shape:
    """A q/k norm's weight: one head's channels, or every head's where the norm spans the projection (OLMo 2)."""
    return lambda cfg: ((heads(cfg) * cfg.kv_channels,) if cfg.qk_norm_full_width else (cfg.kv_channels,))


def _shared_ffn(cfg: ModelConfig) -> int:
    return cfg.moe.shared_expert_ffn_hidden_size


_COLUMN, _ROW, _REPLICATED = "AutoMapping (column)", "AutoMapping (row)", "AutoMapping (replicated)"
_SEQ = Partial.SEQUENCE
_A, _M = "self_attention.", "mlp."  # layer-relative prefixes
_MTP = "mtp."  # an MTP layer's own kinds: `mtp.layers.{i}.enorm.weight` is kind `mtp.enorm.weight`

#: The declaration. Layer kinds are relative to `decoder.layers.{i}.` (and to an MTP layer's
#: `mtp.layers.{i}.transformer_layer.`); the others are whole keys.
KINDS: dict[str, ParamKind] = {k.name: k for k in (
    ParamKind("embedding.word_embeddings.weight", Split.VOCAB, lambda cfg: (cfg.vocab_size, cfg.hidden_size), _COLUMN),
    ParamKind("output_layer.weight", Split.VOCAB, lambda cfg: (cfg.vocab_size, cfg.hidden_size), _COLUMN),
    ParamKind("decoder.final_layernorm.weight", Split.REPLICATED, _h, _REPLICATED, _SEQ),
    # attention
    ParamKind(_A + "linear_qkv.layer_norm_weight", Split.REPLICATED, _h, _REPLICATED, _SEQ,
              local="input_layernorm.weight"),
    ParamKind(_A + "linear_qkv.weight", Split.COLUMN, lambda cfg: (cfg.qkv_rows, cfg.hidden_size), "QKVMapping",
              te_extra=(_A + "linear_qkv", _A + "core_attention")),
    ParamKind(_A + "linear_qkv.bias", Split.COLUMN, lambda cfg: (cfg.qkv_rows,), "QKVMapping"),
    # attention sinks (GPT-OSS): one logit per query head, so split over TP with the heads
    ParamKind(_A + "core_attention.softmax_offset", Split.COLUMN, lambda cfg: (cfg.num_attention_heads,), _COLUMN),
    # full-width q/k norms (OLMo 2) are replicated too: each TP rank applies, and has a gradient for, its heads' slice
    ParamKind(_A + "q_layernorm.weight", Split.REPLICATED, _qk_norm(lambda cfg: cfg.num_attention_heads), _REPLICATED,
              Partial.HEADS),
    ParamKind(_A + "k_layernorm.weight", Split.REPLICATED, _qk_norm(lambda cfg: cfg.num_query_groups), _REPLICATED,
              Partial.HEADS),
    ParamKind(_A + "linear_proj.weight", Split.ROW, lambda cfg: (cfg.hidden_size, _proj_cols(cfg)), _ROW,
              te_extra=(_A + "linear_proj",)),
    ParamKind(_A + "linear_proj.bias", Split.REPLICATED, _h, _REPLICATED, _SEQ),
    # post-norms (Gemma 2/3, OLMo 2): on the summed output of linear_proj / linear_fc2, outside the TP region
    ParamKind(_A + "linear_proj.post_layernorm.weight", Split.REPLICATED, _h, _REPLICATED, _SEQ,  # a TENorm
              te_extra=(_A + "linear_proj.post_layernorm",)),
    ParamKind("input_layernorm.weight", Split.REPLICATED, _h, _REPLICATED, _SEQ,  # TENorm: MLA layers
              te_extra=("input_layernorm",)),
    # MLA (TE spec): down-projections are duplicated TELinear, up-projections column parallel
    ParamKind(_A + "linear_q_proj.weight", Split.COLUMN, lambda cfg: (_mla_q_rows(cfg), cfg.hidden_size), _COLUMN,
              te_extra=(_A + "linear_q_proj",)),
    ParamKind(_A + "linear_q_down_proj.weight", Split.REPLICATED, lambda cfg: (cfg.mla.q_lora_rank, cfg.hidden_size),
              _REPLICATED, _SEQ, te_extra=(_A + "linear_q_down_proj",)),
    ParamKind(_A + "linear_q_up_proj.layer_norm_weight", Split.REPLICATED, lambda cfg: (cfg.mla.q_lora_rank,),
              _REPLICATED, _SEQ),
    ParamKind(_A + "linear_q_up_proj.weight", Split.COLUMN, lambda cfg: (_mla_q_rows(cfg), cfg.mla.q_lora_rank),
              _COLUMN, te_extra=(_A + "linear_q_up_proj",)),
    ParamKind(_A + "linear_kv_down_proj.weight", Split.REPLICATED,
              lambda cfg: (cfg.mla.kv_lora_rank + cfg.mla.qk_pos_emb_head_dim, cfg.hidden_size), _REPLICATED, _SEQ,
              te_extra=(_A + "linear_kv_down_proj",)),
    ParamKind(_A + "linear_kv_up_proj.layer_norm_weight", Split.REPLICATED, lambda cfg: (cfg.mla.kv_lora_rank,),
              _REPLICATED, _SEQ),
    ParamKind(_A + "linear_kv_up_proj.weight", Split.COLUMN,
              lambda cfg: (cfg.num_attention_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim), cfg.mla.kv_lora_rank),
              _COLUMN, te_extra=(_A + "linear_kv_up_proj", _A + "core_attention")),
    # dense MLP
    ParamKind(_M + "linear_fc1.layer_norm_weight", Split.REPLICATED, _h, _REPLICATED, _SEQ,
              local="pre_mlp_layernorm.weight"),
    ParamKind(_M + "linear_fc1.weight", Split.GATED_COLUMN, lambda cfg: (2 * cfg.ffn_hidden_size, cfg.hidden_size),
              "GatedMLPMapping", te_extra=(_M + "linear_fc1",)),
    ParamKind(_M + "linear_fc2.weight", Split.ROW, lambda cfg: (cfg.hidden_size, cfg.ffn_hidden_size), _ROW,
              te_extra=(_M + "linear_fc2",)),
    ParamKind(_M + "linear_fc2.bias", Split.REPLICATED, _h, _REPLICATED, _SEQ),
    ParamKind(_M + "linear_fc2.post_layernorm.weight", Split.REPLICATED, _h, _REPLICATED, _SEQ,
              te_extra=(_M + "linear_fc2.post_layernorm",)),
    # MoE: expert fc1/fc2 split over the expert-TP group (`etp`) instead of TP
    ParamKind("pre_mlp_layernorm.weight", Split.REPLICATED, _h, _REPLICATED, _SEQ,  # TENorm: MoE layers
              te_extra=("pre_mlp_layernorm",)),
    ParamKind(_M + "router.weight", Split.REPLICATED, lambda cfg: (cfg.num_experts, cfg.hidden_size), _REPLICATED,
              _SEQ),
    ParamKind(_M + "router.bias", Split.REPLICATED, lambda cfg: (cfg.num_experts,), _REPLICATED, _SEQ),
    ParamKind(_M + "router.expert_bias", Split.REPLICATED, lambda cfg: (cfg.num_experts,), _REPLICATED),  # a buffer
    ParamKind(_M + "experts.linear_fc1.weight", Split.GATED_COLUMN,
              lambda cfg: (2 * cfg.moe.moe_ffn_hidden_size, cfg.hidden_size), "GatedMLPMapping"),
    ParamKind(_M + "experts.linear_fc2.weight", Split.ROW, lambda cfg: (cfg.hidden_size, cfg.moe.moe_ffn_hidden_size),
              _ROW),
    # expert biases (GPT-OSS): fc1's split as its rows; fc2's added once, after the row-parallel product, and its
    # gradient complete on every TP rank (bridge.nn.moe)
    ParamKind(_M + "experts.linear_fc1.bias", Split.GATED_COLUMN, lambda cfg: (2 * cfg.moe.moe_ffn_hidden_size,),
              "GatedMLPMapping"),
    ParamKind(_M + "experts.linear_fc2.bias", Split.REPLICATED, _h, _REPLICATED),
    ParamKind(_M + "shared_experts.linear_fc1.weight", Split.GATED_COLUMN,
              lambda cfg: (2 * _shared_ffn(cfg), cfg.hidden_size), "GatedMLPMapping",
              te_extra=(_M + "shared_experts.linear_fc1",)),
    ParamKind(_M + "shared_experts.linear_fc2.weight", Split.ROW, lambda cfg: (cfg.hidden_size, _shared_ffn(cfg)), _ROW,
              te_extra=(_M + "shared_experts.linear_fc2",)),
    ParamKind(_M + "shared_experts.gate_weight", Split.REPLICATED, lambda cfg: (1, cfg.hidden_size), _REPLICATED, _SEQ),
    # a multi-token prediction layer's own modules (Megatron Core's MultiTokenPredictionLayer, TE spec: TENorms and a
    # TEColumnParallelLinear); its `transformer_layer` holds the layer kinds above
    ParamKind(_MTP + "enorm.weight", Split.REPLICATED, _h, _REPLICATED, _SEQ, te_extra=("enorm",)),
    ParamKind(_MTP + "hnorm.weight", Split.REPLICATED, _h, _REPLICATED, _SEQ, te_extra=("hnorm",)),
    ParamKind(_MTP + "eh_proj.weight", Split.COLUMN, lambda cfg: (cfg.hidden_size, 2 * cfg.hidden_size), _COLUMN,
              te_extra=("eh_proj",)),
    ParamKind(_MTP + "final_layernorm.weight", Split.REPLICATED, _h, _REPLICATED, _SEQ, te_extra=("final_layernorm",)),
)}



def _rank_shaped(cfg: ModelConfig) -> tuple[int, ...]:
    raise BridgeError("internal: an adapter tensor's shape follows its LoRA rank, which the model config does not hold")


def _adapter_kinds() -> list[ParamKind]:
    """LoRA/DoRA tensors on the adaptable linears (bridge.nn.lora), split over TP as Megatron-Bridge's
    ParallelLinearAdapter splits them: A over the rank for a column-parallel base (its linear_in a ColumnParallelLinear
    gathering its output), over the input like the base for a row-parallel one (a RowParallelLinear); B and the DoRA
    magnitude over the output rows (linear_out a ColumnParallelLinear), like a column-parallel base's weight (fc1's
    [gate_r; up_r] included) or, for a row-parallel base, in plain blocks (its output all-gathered). Routed experts'
    adapters are declared as the dense ones (bridge adapts experts without expert TP). Every gradient is complete."""
    column, row, gated = (Split.COLUMN, _COLUMN), (Split.ROW, _ROW), (Split.GATED_COLUMN, "GatedMLPMapping")
    bases = [(_A + "linear_qkv", column, column), (_A + "linear_proj", row, column)]
    bases += [(f"{_M}{experts}linear_fc1", column, gated) for experts in ("", "experts.")]
    bases += [(f"{_M}{experts}linear_fc2", row, column) for experts in ("", "experts.")]
    return [ParamKind(f"{base}.adapter.{tail}", split, _rank_shaped, mapping)
            for base, a_split, b_split in bases
            for tail, (split, mapping) in (("linear_in.weight", a_split), ("linear_out.weight", b_split),
                                           ("magnitude", b_split))]


KINDS.update({k.name: k for k in _adapter_kinds()})

#: What each key is called in the local spec, where that differs (derived from KINDS).
LOCAL_NAMES: dict[str, str] = {k.name: k.local for k in KINDS.values() if k.local}
_BY_LOCAL_NAME: dict[str, ParamKind] = {k.local: k for k in KINDS.values() if k.local and k.local not in KINDS}
#: TE module (relative to its layer) -> the `_extra_state` entries that follow its tensors (derived from KINDS).
TE_EXTRA: dict[str, tuple[str, ...]] = {k.module: k.te_extra for k in KINDS.values() if k.te_extra}

#: The layer prefix (a decoder layer's, an MTP layer's transformer layer's), a SequentialMLP expert's index and a
#: grouped-GEMM expert's weight (or bias) number: not part of a kind.
_INDEXES = re.compile(r"^decoder\.layers\.\d+\.|^mtp\.layers\.\d+\.transformer_layer\.|(?<=experts\.)local_experts\.\d+\."
                      r"|(?<=experts\.linear_fc[12]\.weight)\d+$|(?<=experts\.linear_fc[12]\.bias)\d+$")
#: An MTP layer's index before its own modules.
_MTP_INDEX = re.compile(r"^mtp\.layers\.\d+\.")


def kind_of(key: str) -> ParamKind:
    """The kind of any Megatron key: global or stage-local layer index, TE or local spec, either expert layout,
    decoder or MTP layer."""
    name = _MTP_INDEX.sub(_MTP, _INDEXES.sub("", key))
    kind = KINDS.get(name) or _BY_LOCAL_NAME.get(name)
    if kind is None:
        raise BridgeError(f"{key} is not a Megatron parameter kind bridge knows (bridge/params.py declares them)")
    return kind
