"""One place that decides when a plain PyTorch function runs as fused torch.compile kernels.

Memory-bound steps (the cross entropy's passes over the logits, the optimizer's pass over every
parameter) are written as ordinary tensor code. On CUDA, torch.compile turns each into one kernel
that reads and writes every tensor once; elsewhere (the CPU of CI and of conversion machines) the
same function runs eagerly, so tests check the maths that the GPU kernel is generated from.
"""
from __future__ import annotations

from typing import Callable

import torch

_COMPILED: dict[tuple[Callable, bool, bool], Callable] = {}
#: For a function that writes into its inputs: no benchmarking of candidate kernel configurations. Inductor
#: benchmarks a pointwise kernel's configurations on the real arguments, so it first saves every argument the kernel
#: mutates: a clone on the GPU or, when that would raise the memory peak, a copy in pinned host memory, which the
#: host allocator then keeps cached. For the optimizer's update that is the flat master weights and both Adam moments
#: (11 GiB each at 2.8 B parameters): at the 8B shape on one H100 the copies failed with "CUDA error: out of
#: memory" beside an async save's pinned buffers. A memory-bound elementwise pass gains little from the search.
IN_PLACE_OPTIONS = {"triton.autotune_pointwise": False}


def fused(fn: Callable, device: torch.device, *, dynamic: bool = False, in_place: bool = False) -> Callable:
    """`fn` compiled on CUDA (once per function; `dynamic`: one kernel for every size; `in_place`: `fn` writes into
    its arguments, see IN_PLACE_OPTIONS); eager elsewhere."""
    if device.type != "cuda":
        return fn
    key = (fn, dynamic, in_place)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=dynamic, options=IN_PLACE_OPTIONS if in_place else None)
    return _COMPILED[key]
