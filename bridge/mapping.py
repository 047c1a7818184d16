"""Declarative HF <-> Megatron mapping rows; each family lists its rows, both directions come from them."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from bridge import transforms
from bridge.config import ModelConfig, MoEConfig
from bridge.errors import BridgeError

ToMegatron = Callable[..., torch.Tensor]
ToHF = Callable[[torch.Tensor, ModelConfig], list[torch.Tensor]]


@dataclass(frozen=True)
class Transform:
    """A pair of pure functions: HF tensors -> one Megatron tensor, and back."""

    name: str
    to_megatron: ToMegatron
    to_hf: ToHF


COPY = Transform("copy", lambda t, cfg: transforms.copy(t, cfg), transforms.uncopy)
FUSE_QKV = Transform("fuse_qkv", transforms.fuse_qkv, transforms.split_qkv)
FUSE_GATE_UP = Transform("fuse_gate_up", transforms.fuse_gate_up, transforms.split_gate_up)


@dataclass(frozen=True)
class Row:
    """One Megatron weight and the HF weight(s) it is made of. `{}` stands for the global layer index."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform = COPY
    layers: str = "all"
    """Which layers have this weight: `all`, `dense` (non-MoE layers) or `moe`."""
    experts: bool = False
    """One conversion per routed expert: `{e}` in the names is the global expert index."""

    @property
    def per_layer(self) -> bool:
        return "{}" in self.megatron


@dataclass(frozen=True)
class Conversion:
    """A row bound to one layer: concrete names on both sides."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform
    layer: int | None
    expert: int | None = None

    def to_megatron(self, hf_tensors: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        return self.transform.to_megatron(*hf_tensors, cfg)

    def to_hf(self, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
        return self.transform.to_hf(tensor, cfg)


def expand(rows: Sequence[Row], num_layers: int, moe: MoEConfig | None = None) -> Iterator[Conversion]:
    """Bind rows to layers in Megatron's state-dict order: embedding, layer 0 rows, layer 1 rows, ..., head.

    Per-expert rows are emitted expert by expert (e0 fc1, e0 fc2, e1 fc1, ...), one tensor at a time.
    """
    pre = [r for r in rows if not r.per_layer and r.megatron.startswith("embedding.")]
    post = [r for r in rows if not r.per_layer and not r.megatron.startswith("embedding.")]
    if moe is None and any(r.layers != "all" or r.experts for r in rows):
        raise BridgeError("internal: MoE mapping rows need the model's MoE config")
    for row in pre:
        yield Conversion(row.megatron, row.hf, row.transform, None)
    for layer in range(num_layers):
        kind = "moe" if moe is not None and layer in moe.moe_layers else "dense"
        present = [r for r in rows if r.per_layer and r.layers in ("all", kind)]
        for is_expert, group in itertools.groupby(present, key=lambda r: r.experts):
            block = list(group)
            for expert in range(moe.num_experts) if is_expert and moe else [None]:
                for row in block:
                    yield Conversion(row.megatron.format(layer, e=expert), tuple(n.format(layer, e=expert) for n in row.hf),
                                     row.transform, layer, expert)
    for row in post:
        yield Conversion(row.megatron, row.hf, row.transform, None)


def _mla_q_rows(cfg: ModelConfig) -> int:
    return cfg.num_attention_heads * (cfg.mla.qk_head_dim + cfg.mla.qk_pos_emb_head_dim)


def _proj_cols(cfg: ModelConfig) -> int:
    return cfg.num_attention_heads * (cfg.mla.v_head_dim if cfg.mla else cfg.kv_channels)


def _shared_ffn(cfg: ModelConfig) -> int:
    return cfg.moe.shared_expert_ffn_hidden_size


_H: Callable[[ModelConfig], tuple[int, ...]] = lambda cfg: (cfg.hidden_size,)  # noqa: E731
#: Global (TP=1, unpadded vocabulary) shape of each Megatron weight kind, from the config: what a source
#: tensor must be before it is converted. Keys are global names without the layer and expert index.
SHAPES: dict[str, Callable[[ModelConfig], tuple[int, ...]]] = {
    "embedding.word_embeddings.weight": lambda cfg: (cfg.vocab_size, cfg.hidden_size),
    "output_layer.weight": lambda cfg: (cfg.vocab_size, cfg.hidden_size),
    "decoder.final_layernorm.weight": _H,
    "input_layernorm.weight": _H,
    "pre_mlp_layernorm.weight": _H,
    "self_attention.linear_qkv.layer_norm_weight": _H,
    "self_attention.linear_qkv.weight": lambda cfg: (cfg.qkv_rows, cfg.hidden_size),
    "self_attention.linear_qkv.bias": lambda cfg: (cfg.qkv_rows,),
    "self_attention.q_layernorm.weight": lambda cfg: (cfg.kv_channels,),
    "self_attention.k_layernorm.weight": lambda cfg: (cfg.kv_channels,),
    "self_attention.linear_proj.weight": lambda cfg: (cfg.hidden_size, _proj_cols(cfg)),
    "self_attention.linear_q_proj.weight": lambda cfg: (_mla_q_rows(cfg), cfg.hidden_size),
    "self_attention.linear_q_down_proj.weight": lambda cfg: (cfg.mla.q_lora_rank, cfg.hidden_size),
    "self_attention.linear_q_up_proj.layer_norm_weight": lambda cfg: (cfg.mla.q_lora_rank,),
    "self_attention.linear_q_up_proj.weight": lambda cfg: (_mla_q_rows(cfg), cfg.mla.q_lora_rank),
    "self_attention.linear_kv_down_proj.weight": lambda cfg: (cfg.mla.kv_lora_rank + cfg.mla.qk_pos_emb_head_dim, cfg.hidden_size),
    "self_attention.linear_kv_up_proj.layer_norm_weight": lambda cfg: (cfg.mla.kv_lora_rank,),
    "self_attention.linear_kv_up_proj.weight": lambda cfg: (cfg.num_attention_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim),
                                                            cfg.mla.kv_lora_rank),
    "mlp.linear_fc1.layer_norm_weight": _H,
    "mlp.linear_fc1.weight": lambda cfg: (2 * cfg.ffn_hidden_size, cfg.hidden_size),
    "mlp.linear_fc2.weight": lambda cfg: (cfg.hidden_size, cfg.ffn_hidden_size),
    "mlp.router.weight": lambda cfg: (cfg.num_experts, cfg.hidden_size),
    "mlp.router.expert_bias": lambda cfg: (cfg.num_experts,),
    "mlp.experts.linear_fc1.weight": lambda cfg: (2 * cfg.moe.moe_ffn_hidden_size, cfg.hidden_size),
    "mlp.experts.linear_fc2.weight": lambda cfg: (cfg.hidden_size, cfg.moe.moe_ffn_hidden_size),
    "mlp.shared_experts.linear_fc1.weight": lambda cfg: (2 * _shared_ffn(cfg), cfg.hidden_size),
    "mlp.shared_experts.linear_fc2.weight": lambda cfg: (cfg.hidden_size, _shared_ffn(cfg)),
    "mlp.shared_experts.gate_weight": lambda cfg: (1, cfg.hidden_size),
}
_INDEXES = re.compile(r"^decoder\.layers\.\d+\.|(?<=experts\.)local_experts\.\d+\.")


def megatron_shape(key: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The global shape a Megatron weight must have for this config (vocabulary unpadded)."""
    try:
        return SHAPES[_INDEXES.sub("", key)](cfg)
    except KeyError:
        raise BridgeError(f"internal: no shape rule for Megatron parameter {key}") from None


def expected_hf_shapes(conv: Conversion, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """The shapes the HF tensors of a conversion must have: the Megatron shape taken back through the transform
    on the meta device (no data)."""
    target = torch.empty(megatron_shape(conv.megatron, cfg), device="meta")
    return [tuple(t.shape) for t in conv.to_hf(target, cfg)]
