"""Where one rank's tensors sit in the global, layout-independent tensors of a `torch_dist` checkpoint.

A rank holds TP/PP/EP shards under stage-local names; `torch_dist` stores each weight as one global tensor
under its stacked key (`decoder.layers.mlp.linear_fc1.weight` `[L, 2F, h]`). A `Placement` maps a local
tensor onto its global tensor as a few `Slab`s (row ranges of the local tensor, each a box at an offset of the
global one): one for most rules, two for SwiGLU's `[gate_r; up_r]`. The distributed optimizer owns arbitrary
flat ranges of these local tensors; `flat_boxes` cuts a flat range of a row-major tensor into at most
2*ndim-1 boxes, each contiguous in memory, so every piece of state becomes a legal DCP chunk at its global
offset, and any other layout can read back exactly the boxes it needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

from bridge.config import ModelConfig
from bridge.converters.torch_dist import dcp_key
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from bridge.models import conversions
from bridge.sharding import Split, is_expert_key, localize, rule_for

Box = tuple[tuple[int, ...], tuple[int, ...]]
"""(offsets, sizes) of a box of a tensor."""


@dataclass(frozen=True)
class Slab:
    """Local rows [lo, hi) of a tensor land at `offsets` of the global tensor (stack axes included)."""

    lo: int
    hi: int
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class Placement:
    """A local tensor's global key and shape and how its rows map into it."""

    key: str
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    slabs: tuple[Slab, ...]
    expert: bool
    """A routed expert's weight: replicated over expert-DP only (each EP rank holds other experts)."""
    replicated: bool
    """The same on every TP rank (norms, routers): TP rank 0 writes it."""

    def boxes(self, lo: int, hi: int, limit: int) -> Iterator[tuple[int, Box]]:
        """(flat start within [lo, hi), global box) of the local flat range [lo, hi), boxes of <= `limit` elements."""
        stack = len(self.global_shape) - len(self.local_shape)
        strides = _strides(self.local_shape)
        for offsets, sizes in flat_boxes(self.local_shape, lo, hi):
            for slab in self.slabs:
                if not self.local_shape:
                    sub = (offsets, sizes)
                else:
                    a, b = max(offsets[0], slab.lo), min(offsets[0] + sizes[0], slab.hi)
                    if a >= b:
                        continue
                    sub = ((a, *offsets[1:]), (b - a, *sizes[1:]))
                for part in split_box(*sub, limit):
                    start = sum(o * s for o, s in zip(part[0], strides))
                    shifted = [o - (slab.lo if d == 0 else 0) + slab.offsets[stack + d] for d, o in enumerate(part[0])]
                    yield start - lo, (tuple(slab.offsets[:stack]) + tuple(shifted), (1,) * stack + part[1])


def _strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]


def flat_boxes(shape: Sequence[int], lo: int, hi: int) -> list[Box]:
    """The flat range [lo, hi) of a row-major tensor of `shape` as boxes in order, each contiguous in memory:
    a partial leading row, whole rows, a partial trailing row (recursively): at most 2*ndim-1 boxes."""
    if lo >= hi:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    (r0, c0), (r1, c1) = divmod(lo, inner), divmod(hi, inner)
    if r0 == r1:
        return [((r0, *o), (1, *s)) for o, s in flat_boxes(shape[1:], c0, c1)]
    boxes: list[Box] = []
    if c0:
        boxes += [((r0, *o), (1, *s)) for o, s in flat_boxes(shape[1:], c0, inner)]
        r0 += 1
    if r1 > r0:
        boxes.append(((r0, *[0] * (len(shape) - 1)), (r1 - r0, *shape[1:])))
    if c1:
        boxes += [((r1, *o), (1, *s)) for o, s in flat_boxes(shape[1:], 0, c1)]
    return boxes


def split_box(offsets: tuple[int, ...], sizes: tuple[int, ...], limit: int) -> Iterator[Box]:
    """A box contiguous in memory -> consecutive boxes of at most `limit` elements (each still contiguous), so
    staging and chunk reads never need more than `limit` elements at once."""
    if math.prod(sizes) <= limit:
        yield offsets, sizes
        return
    dim = next(d for d, s in enumerate(sizes) if s > 1)
    inner = math.prod(sizes[dim + 1:])
    if inner <= limit:
        step = max(1, limit // inner)
        for i in range(0, sizes[dim], step):
            n = min(step, sizes[dim] - i)
            yield (*offsets[:dim], offsets[dim] + i, *offsets[dim + 1:]), (*sizes[:dim], n, *sizes[dim + 1:])
        return
    for i in range(sizes[dim]):
        yield from split_box((*offsets[:dim], offsets[dim] + i, *offsets[dim + 1:]),
                             (*sizes[:dim], 1, *sizes[dim + 1:]), limit)


def rank_names(model: ModelConfig, layout: ParallelLayout, transformer_impl: str, pp_rank: int,
               ep_rank: int) -> dict[tuple[int, str], str]:
    """(chunk, stage-local name) -> global Megatron key, for every weight this rank holds."""
    names: dict[tuple[int, str], str] = {}
    for conv in conversions(model):
        local = localize(conv.megatron, layout, model.num_layers, transformer_impl, model.num_experts)
        if local.pp_rank == pp_rank and local.ep_rank in (None, ep_rank):
            names[(local.chunk, local.name)] = conv.megatron
    return names


def placement(global_key: str, local_shape: Sequence[int], tp: int, tp_rank: int, num_layers: int) -> Placement:
    """The placement of a TP shard of `global_key` (global layer and expert index) in its stacked DCP tensor."""
    key, layer = dcp_key(global_key)
    rule = rule_for(global_key)
    shape = list(local_shape)
    rows = shape[0] if shape else 1
    if rule is Split.REPLICATED or tp == 1:
        slabs, global_shape = [(0, rows, [0] * len(shape))], shape
    elif rule is Split.ROW:
        slabs, global_shape = [(0, rows, [0, tp_rank * shape[1], *[0] * (len(shape) - 2)])], \
            [shape[0], shape[1] * tp, *shape[2:]]
    elif rule is Split.GATED_COLUMN:
        half = rows // 2
        rest = [0] * (len(shape) - 1)
        slabs = [(0, half, [tp_rank * half, *rest]), (half, rows, [half * tp + tp_rank * half, *rest])]
        global_shape = [rows * tp, *shape[1:]]
    elif rule in (Split.COLUMN, Split.VOCAB):
        slabs, global_shape = [(0, rows, [tp_rank * rows, *[0] * (len(shape) - 1)])], [rows * tp, *shape[1:]]
    else:
        raise BridgeError(f"internal: no placement for {global_key} ({rule})")
    stack = [num_layers] if layer is not None else []
    prefix = [layer] if layer is not None else []
    return Placement(key, tuple(stack + global_shape), tuple(shape),
                     tuple(Slab(lo, hi, tuple(prefix + offs)) for lo, hi, offs in slabs),
                     is_expert_key(global_key), rule is Split.REPLICATED)
