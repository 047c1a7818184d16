"""Overlap a conversion's reading with its writing, two tensors in memory at most.

A conversion reads a tensor, reshapes it (fuse, split, cast, check) and writes it. Done in turn, the CPU waits for
the disk and the disk for the CPU. `prefetched` produces the next item in a background thread while the caller
consumes the current one: file reads, torch kernels and file writes all release the GIL, so the two stages run at
once. The producer starts on item N+1 only when the caller has taken item N, so memory holds the item being
consumed and the one being produced, never a queue of them: the conversion's memory bound stays a small multiple
of its largest tensor.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_END = object()
_POLL_S = 0.1


def prefetched(items: Iterable[T]) -> Iterator[T]:
    """Yield `items` in order, the next one made in a background thread while the caller works on the current.
    An error raised while producing is raised here, at the item it would have been; stopping early (an error in
    the caller, or closing the generator) stops the producer after the item it is on."""
    handoff: queue.Queue = queue.Queue(maxsize=1)
    taken, stop = threading.Semaphore(0), threading.Event()

    def produce() -> None:
        try:
            for item in items:
                handoff.put((item, None))
                del item
                while not taken.acquire(timeout=_POLL_S):  # the caller has not taken it yet
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
            handoff.put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            handoff.put((_END, exc))

    thread = threading.Thread(target=produce, name="bridge-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = handoff.get()
            taken.release()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
            del item
    finally:
        stop.set()
        thread.join()
