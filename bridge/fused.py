"""One place that decides when a plain PyTorch function runs as fused torch.compile kernels.

Memory-bound steps (the cross entropy's passes over the logits, the optimizer's pass over every
parameter) are written as ordinary tensor code. On CUDA, torch.compile turns each into one kernel
that reads and writes every tensor once; elsewhere (the CPU of CI and of conversion machines) the
same function runs eagerly, so tests check the maths that the GPU kernel is generated from.
"""
from __future__ import annotations

from typing import Callable

import torch

_COMPILED: dict[tuple[Callable, bool], Callable] = {}


def fused(fn: Callable, device: torch.device, *, dynamic: bool = False) -> Callable:
    """`fn` compiled on CUDA (once per function; `dynamic`: one kernel for every size); eager elsewhere."""
    if device.type != "cuda":
        return fn
    key = (fn, dynamic)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=dynamic)
    return _COMPILED[key]
