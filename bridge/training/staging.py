"""Copies of device state to host memory in bounded pieces, for checkpoint writers.

A save must not need memory in proportion to the model: on one H100 an 8B-shaped run whose training
peaked at 62 GiB died saving, when the optimizer state was gathered into three whole-model fp32 GPU
buffers. Writers here take state one box at a time (`placement.split_box` bounds every box by
`limit_bytes`) and copy it through one reused pinned buffer on CUDA, or read it in place on the CPU;
only an async save, which must outlive the training step, keeps its own host copies.
"""
from __future__ import annotations

import torch

#: The largest piece staged at once (bytes). Bigger tensors are written as several DCP chunks.
STAGING_BYTES = 64 * 2**20


class HostStager:
    """One rank's staging: `host(view)` gives a CPU tensor holding `view`'s values."""

    def __init__(self, device: torch.device, limit_bytes: int = STAGING_BYTES) -> None:
        self.device, self.limit_bytes = device, limit_bytes
        self._pinned: torch.Tensor | None = None
        self.peak_bytes = 0
        """The largest piece staged (bytes): what the per-rank staging costs on top of kept copies."""
        self.kept_bytes = 0
        """Host memory of copies kept past the call (async saves)."""

    def limit(self, dtype: torch.dtype) -> int:
        """Elements of `dtype` per piece."""
        return max(1, self.limit_bytes // torch.empty((), dtype=dtype).element_size())

    def host(self, view: torch.Tensor, *, keep: bool = False) -> torch.Tensor:
        """A host tensor with `view`'s values. Without `keep` it may be the staging buffer itself (or, on the
        CPU, `view`): valid until the next call. With `keep` it owns its memory."""
        nbytes = view.numel() * view.element_size()
        self.peak_bytes = max(self.peak_bytes, nbytes)
        if keep:
            self.kept_bytes += nbytes
            return view.detach().to("cpu", copy=True)
        if view.device.type != "cuda":
            return view.detach()
        if self._pinned is None or self._pinned.numel() < nbytes:
            self._pinned = torch.empty(max(nbytes, min(self.limit_bytes, 2**20)), dtype=torch.uint8, pin_memory=True)
        out = self._pinned[:nbytes].view(view.dtype).view(view.shape)
        out.copy_(view.detach(), non_blocking=True)
        torch.cuda.current_stream(view.device).synchronize()
        return out
