"""The public Python API: a facade over bridge.apps and the converters, the calls every CLI command wraps.

Users and docs import from here (`from bridge.api import import_hf`). The implementations live where the layers put
them: the whole-checkpoint conversions in bridge.converters.convert (training reshards a --load through it), the
reading of an HF config in bridge.models, `AutoBridge` in bridge.apps. Importing this module loads neither
bridge.nn nor transformers.
"""
from __future__ import annotations

from bridge.apps.auto import AutoBridge
from bridge.converters.convert import (OpenCheckpoint, default_out, export_hf, import_hf, inspect_checkpoint,
                                       open_checkpoint, reshard)
from bridge.models import load_hf_config

__all__ = ["AutoBridge", "OpenCheckpoint", "default_out", "export_hf", "import_hf", "inspect_checkpoint",
           "load_hf_config", "open_checkpoint", "reshard"]
