"""Declarative HF <-> Megatron mapping rows; each family lists its rows, both directions come from them."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from bridge import transforms
from bridge.config import ModelConfig, MoEConfig
from bridge.errors import BridgeError
from bridge.params import kind_of

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
    stacked: bool = False
    """With `experts`: the HF tensors hold every expert of the layer stacked on dim 0 (GPT-OSS's `gate_up_proj`
    [E, h, 2F]), and each expert's conversion reads and writes its own index of them."""

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
    hf_index: int | None = None
    """Index on dim 0 of the HF tensors that this conversion's part is (a stacked expert row); None: all of them."""

    def to_megatron(self, hf_tensors: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        return self.transform.to_megatron(*hf_tensors, cfg)

    def to_hf(self, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
        return self.transform.to_hf(tensor, cfg)


def expand(rows: Sequence[Row], num_layers: int, moe: MoEConfig | None = None) -> Iterator[Conversion]:
    """Bind rows to layers in Megatron's state-dict order: embedding, layer 0 rows, layer 1 rows, ..., the rows after
    the layers (final norm, MTP layers, head) in their order.

    Per-expert rows are emitted expert by expert (e0 fc1, e0 fc2, e1 fc1, ...), one tensor at a time; an MTP layer's
    expert rows (no layer index) too.
    """
    pre = [r for r in rows if not r.per_layer and r.megatron.startswith("embedding.")]
    post = [r for r in rows if not r.per_layer and not r.megatron.startswith("embedding.")]
    if moe is None and any(r.layers != "all" or r.experts for r in rows):
        raise BridgeError("internal: MoE mapping rows need the model's MoE config")
    yield from _bind(pre, None, moe)
    for layer in range(num_layers):
        kind = "moe" if moe is not None and layer in moe.moe_layers else "dense"
        yield from _bind([r for r in rows if r.per_layer and r.layers in ("all", kind)], layer, moe)
    yield from _bind(post, None, moe)


def _bind(rows: Sequence[Row], layer: int | None, moe: MoEConfig | None) -> Iterator[Conversion]:
    """`rows` bound to one layer (None: rows without a layer index), each block of expert rows once per expert."""
    for is_expert, group in itertools.groupby(rows, key=lambda r: r.experts):
        block = list(group)
        for expert in range(moe.num_experts) if is_expert and moe else [None]:
            for row in block:
                yield Conversion(row.megatron.format(layer, e=expert), tuple(n.format(layer, e=expert) for n in row.hf),
                                 row.transform, layer, expert, expert if row.stacked else None)


def megatron_shape(key: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The global shape a Megatron weight must have for this config (vocabulary unpadded), from its kind."""
    return kind_of(key).shape(cfg)


def expected_hf_shapes(conv: Conversion, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """The shapes the HF tensors of a conversion must have: the Megatron shape taken back through the transform
    on the meta device (no data); a stacked row's tensors hold every expert."""
    target = torch.empty(megatron_shape(conv.megatron, cfg), device="meta")
    stack = () if conv.hf_index is None else (cfg.num_experts,)
    return [(*stack, *t.shape) for t in conv.to_hf(target, cfg)]
