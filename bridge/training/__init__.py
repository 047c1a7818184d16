"""bridge's parallel trainer: TP/SP/PP(1F1B, interleaved)/DP, ZeRO-1, bf16 with fp32 masters, exact resume.

`TrainConfig` and `train` load on first use (PEP 562): the CLI builds `bridge train`'s flags from
bridge.training.config alone, and every other command then starts without the trainer's imports.
"""
from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "train"]

_HOMES = {"TrainConfig": "bridge.training.config", "train": "bridge.training.run"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
