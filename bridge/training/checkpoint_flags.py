"""The checkpoint flags of `bridge train` (--ckpt-format, --async-save), checked before any process starts."""
from __future__ import annotations

from bridge.errors import BridgeError
from bridge.training.config import TrainConfig

CKPT_FORMATS = ("torch", "torch_dist")


def check_checkpoint_flags(cfg: TrainConfig) -> None:
    """A known format; --async-save only with torch_dist and --save (Megatron-LM's rule)."""
    if cfg.ckpt_format not in CKPT_FORMATS:
        raise BridgeError(f"--ckpt-format {cfg.ckpt_format} is not one of {', '.join(CKPT_FORMATS)}")
    if cfg.async_save and cfg.ckpt_format != "torch_dist":
        raise BridgeError("--async-save writes torch_dist checkpoints in the background: add --ckpt-format torch_dist")
    if cfg.async_save and not cfg.save:
        raise BridgeError("--async-save needs --save DIR")
