"""Training checkpoints in Megatron's legacy layout, written atomically, and their loading for exact resume.

    SAVE/bridge.json, SAVE/hf_meta/              what `bridge export` needs (written once)
    SAVE/iter_0000500/mp_rank_00[_000][_000]/model_optim_rng.pt     (_EEE: the EP rank, when EP > 1)
    SAVE/latest_checkpointed_iteration.txt        updated last
    SAVE/train_summary.json                       iterations, tokens, losses (for `bridge push`'s card)

Each rank file holds `args`, `checkpoint_version`, `iteration`, `model` (`model0`, ... with virtual
chunks; exactly the import's names), and for training `optimizer` (fp32 masters and Adam moments
per weight name), `opt_param_scheduler`, `rng_state` and `train_state` (data position, loss curve).
Everything is tensors and plain containers, so `torch.load(weights_only=True)` reads it.

Atomicity: ranks write into `iter_N.tmp/`; after a barrier rank 0 renames it to `iter_N/` and only
then rewrites the tracker (write-then-rename). A run killed mid-write leaves the tracker on the
previous iteration and a `.tmp` folder that the next save or run removes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from bridge.checkpoint import HF_META_DIR, CheckpointMeta, copy_hf_meta
from bridge.converters.megatron_legacy import CHECKPOINT_VERSION, FILE_NAME, TRACKER, iteration_dir_name, model_keys
from bridge.layout import ParallelLayout
from bridge.parallel.state import ParallelState

log = logging.getLogger(__name__)

SUMMARY_FILE = "train_summary.json"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rng_state() -> list[dict[str, torch.Tensor]]:
    state = {"torch_rng_state": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return [state]


def set_rng_state(states: list[dict[str, torch.Tensor]]) -> None:
    state = states[0]
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])


def model_entries(chunks: Sequence[nn.Module], layout: ParallelLayout) -> dict[str, dict[str, torch.Tensor]]:
    """`model` / `model{v}`: each chunk's state dict copied to the CPU (own storage, not buffer views)."""
    return {key: {name: t.detach().to("cpu", copy=True) for name, t in chunk.state_dict().items()}
            for key, chunk in zip(model_keys(layout), chunks)}


def write_meta(save: Path, meta: CheckpointMeta, hf_meta_src: Path | None) -> None:
    """bridge.json and hf_meta/ in the save folder, so `bridge export SAVE` works on any iteration."""
    save.mkdir(parents=True, exist_ok=True)
    meta.save(save)
    if hf_meta_src is not None and hf_meta_src.is_dir() and not (save / HF_META_DIR).is_dir():
        copy_hf_meta(hf_meta_src, save / HF_META_DIR)


def save_checkpoint(save: Path, iteration: int, ps: ParallelState, chunks: Sequence[nn.Module], optimizer: Any,
                    entries: dict[str, Any], *, keep_last: int | None = None, summary: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. `entries` holds args, scheduler, train_state (plain values)."""
    opt_state = optimizer.state_dict()  # collective under the distributed optimizer
    final = save / iteration_dir_name(iteration)
    tmp = save / (final.name + ".tmp")
    if ps.rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    if ps.writes_checkpoint:  # DP rank 0, or with EP the first copy of each EP rank (its own experts)
        state: dict[str, Any] = {"args": entries["args"], "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
        state.update(model_entries(chunks, ps.layout))
        state.update(optimizer=opt_state, opt_param_scheduler=entries["opt_param_scheduler"], rng_state=rng_state(),
                     train_state=entries["train_state"])
        folder = tmp / ps.layout.rank_dir(ps.tp_rank, ps.pp_rank, ps.ep_rank)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, folder / FILE_NAME)
    _barrier()
    if ps.rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text(save / TRACKER, str(iteration))
        if summary is not None:
            _write_text(save / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        if keep_last:
            prune(save, keep_last)
    _barrier()
    log.info("saved checkpoint %s", final)
    return final


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prune(save: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` iteration folders (the tracked one always stays)."""
    iters = sorted(int(p.name[5:]) for p in save.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    for it in iters[:-keep_last]:
        shutil.rmtree(save / iteration_dir_name(it), ignore_errors=True)


def remove_partial(save: Path) -> None:
    """Remove `iter_*.tmp` folders left by a run killed while saving."""
    for path in save.glob("iter_*.tmp"):
        log.info("removing %s, left by a run stopped while saving", path)
        shutil.rmtree(path, ignore_errors=True)


def megatron_training_args(base: argparse.Namespace, cfg: Any, iteration: int) -> argparse.Namespace:
    """The model `args` plus the training flags Megatron records (plain values only)."""
    args = argparse.Namespace(**vars(base))
    for name in ("micro_batch_size", "global_batch_size", "seq_length", "train_iters", "lr", "min_lr", "lr_decay_style",
                 "lr_warmup_iters", "weight_decay", "clip_grad", "adam_beta1", "adam_beta2", "adam_eps", "seed",
                 "sequence_parallel", "use_distributed_optimizer", "save_interval", "split"):
        setattr(args, name, getattr(cfg, name))
    args.data_path = list(cfg.data_path)
    args.recompute_granularity = cfg.recompute
    args.iteration = iteration
    args.consumed_train_samples = iteration * cfg.global_batch_size
    return args
