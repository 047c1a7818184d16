"""One rank's checkpoint saves: the format (`--ckpt-format`), and `--async-save`'s background writes.

Sync: every rank writes its files, then the save is committed (tracker last). Async (torch_dist only, as
in Megatron-LM): the rank's state is copied to host memory (the only stall of training), a background
thread writes the `.distcp` file, and training goes on. The save is finalized (every rank's write joined,
`.metadata` gathered and written, the folder renamed, the tracker updated: a collective) at the next save
or at the end of the run, as Megatron-LM's `finalize_async_save` does; until then the previous checkpoint
stays the tracked one, so a run killed while writing resumes from it. The thread is not a daemon: the
process does not exit before its last write is on disk.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.converters.dcp_parts import DcpPart
from bridge.training import checkpointing as ckpt
from bridge.training import dist_save
from bridge.training.legacy_save import write_rank_files
from bridge.training.staging import HostStager

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """An async save in flight: its thread, and what the thread produced (a chunk table or the exception)."""

    iteration: int
    tmp: Path
    summary: dict[str, Any] | None
    thread: threading.Thread
    result: DcpPart | BaseException | None = None


class Checkpointer:
    """Saves for one rank: `save(iteration, entries, summary)` at every save point, `finalize()` before exiting."""

    def __init__(self, save: Path, rs: Any, *, fmt: str = "torch", async_save: bool = False,
                 keep_last: int | None = None) -> None:
        self.save_dir, self.rs, self.fmt, self.async_save, self.keep_last = save, rs, fmt, async_save, keep_last
        self.stager = HostStager(rs.device)
        self._reserving = self._reserve_host_copies() if fmt == "torch_dist" and async_save else None
        self.pending: _Pending | None = None
        self.stall_s: list[float] = []
        """Seconds each save held up training (for async saves: the staging to host)."""
        self.saved: list[int] = []
        """The iterations this run saved: what --keep-last-checkpoints keeps (checkpointing.prune)."""

    def _view(self) -> dist_save.RankView:
        rs = self.rs
        return dist_save.RankView(rs.ps, rs.chunks, rs.optimizer, rs.plan.model, rs.plan.transformer_impl)

    def _reserve_host_copies(self) -> threading.Thread:
        """Pin the async saves' host buffers while training starts (HostStager.reserve)."""
        sizes = [c.data.numel() * c.data.element_size() for c in dist_save.rank_chunks(self._view(), self.stager.limit_bytes)]
        thread = threading.Thread(target=self.stager.reserve, args=(sizes,), name="pin-host-buffers", daemon=True)
        thread.start()
        return thread

    def save(self, iteration: int, entries: dict[str, Any], summary: dict[str, Any] | None) -> None:
        """Collective: every rank calls it at the same iteration."""
        self.finalize()
        start = time.perf_counter()
        if self._reserving is not None:  # pinning not finished by the first save: the rest counts as its stall
            self._reserving.join()
        entries, summary = copy.deepcopy(entries), copy.deepcopy(summary)  # the loss curves go on growing
        rs, ps = self.rs, self.rs.ps
        tmp = ckpt.begin_save(self.save_dir, iteration, ps)
        with ckpt.written_or_removed(tmp):
            if self.fmt == "torch":
                write_rank_files(tmp, iteration, ps, rs.chunks, rs.optimizer, entries, self.stager)
                self._commit(iteration, tmp, summary)
                self.stall_s.append(time.perf_counter() - start)
                return
            staged = dist_save.stage(self._view(), iteration, entries, self.stager, keep=self.async_save)
            if not self.async_save:
                part = dist_save.write_files(tmp, staged, self.stager)
                dist_save.finish(tmp, part, ps.rank)
                self._commit(iteration, tmp, summary)
                self.stall_s.append(time.perf_counter() - start)
                return
        pending = _Pending(iteration, tmp, summary, thread=None)  # type: ignore[arg-type]
        pending.thread = threading.Thread(target=self._write, args=(pending, staged), name=f"save-{iteration}")
        pending.thread.start()
        self.pending = pending
        self.stall_s.append(time.perf_counter() - start)

    def _write(self, pending: _Pending, staged: dist_save.StagedSave) -> None:
        try:
            pending.result = dist_save.write_files(pending.tmp, staged, self.stager)
        except BaseException as exc:  # noqa: BLE001  (reported to every rank by finalize)
            pending.result = exc

    def finalize(self) -> None:
        """Collective: complete the async save in flight, if any (join, gather metadata, commit)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        pending.thread.join()
        with ckpt.written_or_removed(pending.tmp):
            dist_save.finish(pending.tmp, pending.result, self.rs.ps.rank)
            self._commit(pending.iteration, pending.tmp, pending.summary)

    def _commit(self, iteration: int, tmp: Path, summary: dict[str, Any] | None) -> None:
        self.saved.append(iteration)
        ckpt.commit_save(self.save_dir, iteration, self.rs.ps, tmp, keep_last=self.keep_last, saved=self.saved,
                         summary=summary)
