"""Keep conversion memory flat: make glibc return large freed buffers to the OS.

glibc serves allocations above its mmap threshold with mmap and gives them back on free, but it
raises that threshold (up to 32 MiB) every time such a block is freed. Streaming conversion frees a
tensor-sized block per weight, so after a few tensors most allocations come from the heap, whose
freed space is fragmented and not returned: RSS then grows with the model (measured: ~30 MiB per
Llama-3.2-1B layer). A fixed threshold stops the drift; peak RSS stays at the largest tensors.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
THRESHOLD_BYTES = 1 << 20


def return_large_buffers_to_os() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (a no-op elsewhere). Returns whether it took effect."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): their allocators do not drift this way
    ok = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    log.debug("mallopt(M_MMAP_THRESHOLD, %d) -> %s", THRESHOLD_BYTES, ok)
    return ok
