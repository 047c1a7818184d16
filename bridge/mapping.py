"""Declarative HF <-> Megatron mapping rows; each family lists its rows, both directions come from them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from bridge import transforms
from bridge.config import ModelConfig

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

    def to_megatron(self, hf_tensors: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        return self.transform.to_megatron(*hf_tensors, cfg)

    def to_hf(self, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
        return self.transform.to_hf(tensor, cfg)


def expand(rows: Sequence[Row], num_layers: int) -> Iterator[Conversion]:
    """Bind rows to layers in Megatron's state-dict order: embedding, layer 0 rows, layer 1 rows, ..., head."""
    pre = [r for r in rows if not r.per_layer and r.megatron.startswith("embedding.")]
    post = [r for r in rows if not r.per_layer and not r.megatron.startswith("embedding.")]
    for row in pre:
        yield Conversion(row.megatron, row.hf, row.transform, None)
    for layer in range(num_layers):
        for row in (r for r in rows if r.per_layer):
            yield Conversion(row.megatron.format(layer), tuple(n.format(layer) for n in row.hf), row.transform, layer)
    for row in post:
        yield Conversion(row.megatron, row.hf, row.transform, None)
