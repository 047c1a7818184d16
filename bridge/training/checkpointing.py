"""Training checkpoint folders: atomic commit, tracker, pruning, and the files written once per save folder.

    SAVE/bridge.json, SAVE/hf_meta/              what `bridge export` needs (written once)
    SAVE/iter_0000500/...                         the ranks' files (legacy mp_rank_* folders, or torch_dist)
    SAVE/latest_checkpointed_iteration.txt        updated last
    SAVE/train_summary.json                       iterations, tokens, losses (for `bridge push`'s card)

What the ranks write in between: bridge/training/legacy_save.py (`--ckpt-format torch`) and dist_save.py
(`torch_dist`); bridge/training/saver.py picks one and runs async saves.

Atomicity: ranks write into `iter_N.tmp/`; after a barrier rank 0 renames it to `iter_N/` and only
then rewrites the tracker (write-then-rename). A run killed mid-write leaves the tracker on the
previous iteration and a `.tmp` folder that the next save or run removes; a save that fails (a full
disk, Ctrl-C) removes its `.tmp` folder itself.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch.distributed as dist

from bridge.checkpoint import HF_META_DIR, CheckpointMeta, copy_hf_meta
from bridge.converters.megatron_legacy import TRACKER, iteration_dir_name
from bridge.errors import disk_space_checked
from bridge.parallel.state import ParallelState

log = logging.getLogger(__name__)

SUMMARY_FILE = "train_summary.json"
#: What to do when the disk fills up during a save (the previous checkpoint is still the tracked one).
NO_SPACE_ADVICE = "free space there or pass a --save on another disk, then resume from the last checkpoint"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def write_meta(save: Path, meta: CheckpointMeta, hf_meta_src: Path | None) -> None:
    """bridge.json and hf_meta/ in the save folder, so `bridge export SAVE` works on any iteration."""
    save.mkdir(parents=True, exist_ok=True)
    meta.save(save)
    if hf_meta_src is not None and hf_meta_src.is_dir() and not (save / HF_META_DIR).is_dir():
        copy_hf_meta(hf_meta_src, save / HF_META_DIR)


def begin_save(save: Path, iteration: int, ps: ParallelState) -> Path:
    """Collective: the empty `iter_N.tmp/` every rank writes into."""
    tmp = save / (iteration_dir_name(iteration) + ".tmp")
    if ps.rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    if ps.rank == 0:
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


@contextlib.contextmanager
def written_or_removed(tmp: Path) -> Iterator[None]:
    """A save that fails (a full disk, Ctrl-C) removes its `iter_N.tmp/` rather than leave it filling the disk; the
    tracked checkpoint is untouched. A full disk is one line naming the file system."""
    try:
        with disk_space_checked(tmp, NO_SPACE_ADVICE):
            yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_save(save: Path, iteration: int, ps: ParallelState, tmp: Path, *, saved: Sequence[int],
                keep_last: int | None = None, summary: dict[str, Any] | None = None) -> Path:
    """Collective, once every rank's files in `tmp` are complete: rank 0 renames it to `iter_N/`, then rewrites the
    tracker (last), the summary, and prunes by `saved`, this run's saves up to this one."""
    final = save / iteration_dir_name(iteration)
    _barrier()
    if ps.rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text(save / TRACKER, str(iteration))
        if summary is not None:
            _write_text(save / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        if keep_last:
            prune(save, keep_last, saved)
    _barrier()
    log.info("saved checkpoint %s", final)
    return final


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with disk_space_checked(path, NO_SPACE_ADVICE):
            tmp.write_text(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def iterations(save: Path) -> list[int]:
    """The iterations of the `iter_N/` folders in `save`, ascending."""
    return sorted(int(p.name[5:]) for p in save.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())


def prune(save: Path, keep_last: int, saved: Sequence[int]) -> None:
    """Keep the newest `keep_last` checkpoints of this run's line of iterations: its own saves (`saved`, ascending;
    the last one is tracked), newest first, then the older folders below its latest save, newest first.

    Folders past the latest save are another run's (after a rollback to an earlier iteration, or a restart into a
    used --save): they are never removed, and neither is a save of this run among the last `keep_last` (ranking the
    folders by iteration alone would keep those instead and remove the checkpoint just saved).
    """
    own = sorted(set(saved), reverse=True)
    older = [it for it in reversed(iterations(save)) if it < own[0] and it not in own]
    for it in (own + older)[keep_last:]:
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
                 "sequence_parallel", "use_distributed_optimizer", "save_interval", "split", "ckpt_format",
                 "async_save"):
        setattr(args, name, getattr(cfg, name))
    args.data_path = list(cfg.data_path)
    args.recompute_granularity = cfg.recompute
    args.iteration = iteration
    args.consumed_train_samples = iteration * cfg.global_batch_size
    return args
