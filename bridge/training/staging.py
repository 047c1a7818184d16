"""Copies of device state to host memory in bounded pieces, for checkpoint writers.

A save must not need memory in proportion to the model: on one H100 an 8B-shaped run whose training
peaked at 62 GiB died saving, when the optimizer state was gathered into three whole-model fp32 GPU
buffers. Writers here take state one box at a time (`placement.split_box` bounds every box by
`limit_bytes`) and copy it through one reused pinned buffer on CUDA, or read it in place on the CPU.

An async save must keep its copies past the training step. Those go to pinned host buffers that the
stager keeps from one save to the next (the boxes of every save are the same) and pins in the background
while training starts (`reserve`), as Megatron-LM's persistent async workers keep theirs; the copies are
queued without waiting (`kept_ready()` says when they have landed), so the stall of training is the time
to queue them (docs/performance.md has what pageable copies cost).
"""
from __future__ import annotations

from typing import Any

import torch

#: The largest piece staged at once (bytes). Bigger tensors are written as several DCP chunks.
STAGING_BYTES = 64 * 2**20


class HostStager:
    """One rank's staging: `host(view)` gives a CPU tensor holding `view`'s values."""

    def __init__(self, device: torch.device, limit_bytes: int = STAGING_BYTES) -> None:
        self.device, self.limit_bytes = device, limit_bytes
        self._pinned: torch.Tensor | None = None
        self._kept: list[torch.Tensor] = []
        self._next_kept = 0
        self.peak_bytes = 0
        """The largest piece staged (bytes): what the per-rank staging costs on top of kept copies."""
        self.kept_bytes = 0
        """Host memory of copies kept past the call (async saves); on CUDA counted once, however many saves reuse it."""

    def limit(self, dtype: torch.dtype) -> int:
        """Elements of `dtype` per piece."""
        return max(1, self.limit_bytes // torch.empty((), dtype=dtype).element_size())

    def reserve(self, sizes: list[int]) -> None:
        """Pin the kept buffers of a save whose boxes have these byte sizes, in order, before it happens: run in a
        background thread at the start of training, it takes the pinning (seconds for a large model) out of the
        first save's stall. CUDA only; the first save waits for it to finish."""
        if self.device.type != "cuda":
            return
        for slot, nbytes in enumerate(sizes):
            self._pinned_slot(slot, nbytes)

    def begin_kept(self) -> None:
        """A new save's kept copies start over in the buffers of the previous one (whose writes are done)."""
        self._next_kept = 0

    def host(self, view: torch.Tensor, *, keep: bool = False) -> torch.Tensor:
        """A host tensor with `view`'s values. Without `keep` it may be the staging buffer itself (or, on the
        CPU, `view`): valid until the next call. With `keep` it stays valid until the next `begin_kept()`;
        on CUDA it is valid only once `kept_ready()` has been waited on."""
        nbytes = view.numel() * view.element_size()
        self.peak_bytes = max(self.peak_bytes, nbytes)
        if keep:
            return self._keep(view, nbytes)
        if view.device.type != "cuda":
            return view.detach()
        if self._pinned is None or self._pinned.numel() < nbytes:
            self._pinned = torch.empty(max(nbytes, min(self.limit_bytes, 2**20)), dtype=torch.uint8, pin_memory=True)
        out = self._pinned[:nbytes].view(view.dtype).view(view.shape)
        out.copy_(view.detach(), non_blocking=True)
        torch.cuda.current_stream(view.device).synchronize()
        return out

    def _keep(self, view: torch.Tensor, nbytes: int) -> torch.Tensor:
        if view.device.type != "cuda":
            self.kept_bytes += nbytes
            return view.detach().clone()
        slot, self._next_kept = self._next_kept, self._next_kept + 1
        out = self._pinned_slot(slot, nbytes)[:nbytes].view(view.dtype).view(view.shape)
        out.copy_(view.detach(), non_blocking=True)  # stream-ordered: later optimizer steps cannot overtake it
        return out

    def _pinned_slot(self, slot: int, nbytes: int) -> torch.Tensor:
        """The kept buffer `slot` (the slot-th box of a save), pinned and grown to at least `nbytes`."""
        if slot == len(self._kept) or self._kept[slot].numel() < nbytes:
            held = self._kept[slot].numel() if slot < len(self._kept) else 0
            self._kept[slot:slot + 1] = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)]
            self.kept_bytes += nbytes - held
        return self._kept[slot]

    def kept_ready(self) -> Any:
        """What a reader of kept copies waits on (`.synchronize()`): a CUDA event after the queued copies, or
        None on the CPU, where the copies are done already."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event
