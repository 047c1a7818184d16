"""bridge: move large language models between Hugging Face and Megatron-style parallel training.

The top-level names load their modules on first use (PEP 562), so that importing a light part such
as `bridge.data` does not import torch: data-preparation workers start in fresh processes.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AutoBridge": "bridge.apps.auto",
    "BridgeError": "bridge.errors",
    "ModelConfig": "bridge.config",
    "ParallelLayout": "bridge.layout",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
