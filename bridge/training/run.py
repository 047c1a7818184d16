"""Entry points of `bridge train`: validate, reshard the load if needed, then run the ranks.

Two ways in, one code path per rank: `--nproc N` spawns N local workers with torchrun's environment
(bridge.launch), and under `torchrun ... -m bridge.cli train` every process is already a rank.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch.distributed as dist

from bridge.converters.convert import reshard
from bridge.converters.megatron_legacy import LegacyCheckpointReader, read_tracker
from bridge.converters.torch_dist import checkpoint_format
from bridge.errors import BridgeError
from bridge.launch import launch
from bridge.parallel.state import init_distributed
from bridge.training.checkpointing import remove_partial
from bridge.training.config import TrainConfig
from bridge.training.lora_run import resolve_lora_resume
from bridge.training.plan import Plan, make_plan

log = logging.getLogger(__name__)


def _needs_reshard(cfg: TrainConfig, plan: Plan) -> bool:
    """A legacy checkpoint in another layout; a torch_dist one is read at any layout as it is."""
    if plan.load_meta is None or plan.load_meta.layout == plan.layout:
        return False
    return checkpoint_format(Path(cfg.load), recorded=plan.load_meta.format) == "torch"


def reshard_target(cfg: TrainConfig, plan: Plan) -> Path:
    base = Path(cfg.save) if cfg.save else Path(tempfile.gettempdir()) / f"bridge-train-{os.getuid()}"
    return base / f".load-{Path(cfg.load).resolve().name}-{plan.layout.name}"


def resolve_load(cfg: TrainConfig, plan: Plan, *, do_reshard: bool = True) -> TrainConfig:
    """If --load is in another TP/PP/VPP layout, reshard its weights to the requested one (CPU, streaming).

    A legacy training checkpoint's optimizer state is laid out per rank and is not resharded: resuming it in
    another layout is refused with the ways out. torch_dist checkpoints need nothing: every rank reads its boxes.
    """
    if not _needs_reshard(cfg, plan):
        return cfg
    old = plan.load_meta.layout
    iteration = read_tracker(Path(cfg.load))
    has_optimizer = plan.load_meta.format == "torch" and "optimizer" in LegacyCheckpointReader(Path(cfg.load), old).state(0, 0)
    if has_optimizer and not cfg.finetune and cfg.lora_rank is None:  # a LoRA base's optimizer state is unused
        raise BridgeError(f"{cfg.load} is a training checkpoint at {old.name}; resume it with --tp {old.tp} --pp {old.pp}"
                          f"{f' --vpp {old.vpp}' if old.vpp else ''}, or pass --finetune to load only its weights "
                          f"(resharded to {plan.layout.name}) with a fresh optimizer; checkpoints saved with "
                          "--ckpt-format torch_dist resume on any layout")
    target = reshard_target(cfg, plan)
    if do_reshard:
        log.info("resharding %s (%s) to %s in %s", cfg.load, old.name, plan.layout.name, target)
        reshard(cfg.load, target, plan.layout, iteration=None if iteration == "release" else int(iteration), overwrite=True)
    return dataclasses.replace(cfg, load=str(target), load_as_given=cfg.load)


def remove_reshard(cfg: TrainConfig) -> None:
    """The automatic reshard of --load is a full copy of the model: gone once the ranks have read it."""
    if cfg.load_as_given is not None and Path(cfg.load).is_dir():
        import shutil

        shutil.rmtree(cfg.load, ignore_errors=True)
        parent = Path(cfg.load).parent
        if parent.name.startswith("bridge-train-") and not any(parent.iterdir()):
            parent.rmdir()


#: PyTorch's CUDA allocator setting for training when the user names none. Expandable segments grow mapped memory
#: instead of caching fixed blocks, so memory that one micro-batch's large tensors freed fits the next one's. Without
#: it a run whose peak nears the card's memory can fail with gigabytes reserved but unused; with it such runs fit, at
#: the same speed (docs/performance.md). torchtitan's launcher sets it too.
CUDA_ALLOC_CONF = "expandable_segments:True"
_ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def default_cuda_allocator(device: str) -> None:
    """Set CUDA_ALLOC_CONF for CUDA training unless the user set an allocator config. It must come before this
    process touches CUDA; the ranks `--nproc` spawns inherit it."""
    if device == "cuda" and not any(os.environ.get(name) for name in _ALLOC_CONF_VARS):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_CONF


def _rank_main(cfg: TrainConfig, plan: Plan) -> dict[str, Any] | None:
    # imported here: the ranks' code, which the launching process never runs
    from bridge.training.loop import train_rank

    logging.basicConfig(level=logging.INFO if dist.get_rank() == 0 else logging.WARNING, format="%(message)s")
    if dist.get_rank() != 0:  # under torchrun `bridge` configured logging already: one rank tells what happens
        logging.getLogger().setLevel(logging.WARNING)
    return train_rank(cfg, plan)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Validate, then train on `--nproc` spawned ranks or as this torchrun rank; rank 0's summary."""
    default_cuda_allocator(cfg.resolved_device())
    cfg = resolve_lora_resume(cfg)  # --load of a LoRA run: its base, and the adapter to resume
    plan = make_plan(cfg)
    # no --global-batch-size: one micro-batch per DP rank and step (Megatron-LM's default)
    cfg = dataclasses.replace(cfg, global_batch_size=plan.global_microbatches * cfg.micro_batch_size)
    backend = "nccl" if cfg.resolved_device() == "cuda" else "gloo"
    if not cfg.save and int(os.environ.get("RANK", "0")) == 0:
        log.warning("no --save: this run keeps nothing of what it trains; pass --save DIR for checkpoints")
    if cfg.nproc is not None:
        cfg = resolve_load(cfg, plan)
        log.info("starting %d ranks (%s): %s, dp=%d, %d micro-batches per rank per step", plan.world_size, backend,
                 plan.layout.name, plan.dp, plan.num_microbatches)
        try:
            return launch(_rank_main, plan.world_size, cfg, plan, backend=backend)[0]
        except BaseException:
            if cfg.save and Path(cfg.save).is_dir():  # the ranks are gone: what a failed save left goes too
                remove_partial(Path(cfg.save))
            raise
        finally:
            remove_reshard(cfg)
    init_distributed(backend, timeout_s=3600.0)
    try:
        cfg = resolve_load(cfg, plan, do_reshard=dist.get_rank() == 0)
        dist.barrier()
        return _rank_main(cfg, plan)
    finally:
        if dist.get_rank() == 0:  # every rank read its weights before the first step
            remove_reshard(cfg)
        dist.destroy_process_group()
