"""A conversion over several processes: its tensors split into groups of about equal bytes, one spawned process each.

One process converts at about one core's speed: reading, the mapping's transforms, casts and the serialisation into
the output file all run on it. Each group's process streams its own tensors into its own output files, so memory
stays bounded per process (one tensor at a time, as in one process), and the parent writes what spans the groups
(an index, DCP's `.metadata`) from what each process reports back. Processes are spawned, not forked: the parent may
hold threads (torch's pools, a progress bar) that a fork would copy in a locked state.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Collection, Sequence

from bridge.errors import BridgeError

#: prctl(2) option: the signal this process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def check_workers(workers: int) -> None:
    """`--workers` must name at least one process."""
    if workers < 1:
        raise BridgeError(f"--workers {workers} must be 1 or more")


def balanced_groups(sizes: Sequence[int], keys: Sequence[Collection[str]], n: int) -> list[range]:
    """Split items, in order, into at most `n` consecutive ranges of about equal total size.

    Items that share a key stay in one range (a module's rows, which its `_extra_state` follows; the rows that
    write one stacked HF tensor): a range ends only where no key of an item before it appears after it.
    """
    last: dict[str, int] = {}
    for i, item_keys in enumerate(keys):
        for key in item_keys:
            last[key] = i
    cuts, reach, done = [], -1, 0  # cuts: (index a range may start at, bytes before it)
    for i, item_keys in enumerate(keys):
        if i and reach < i:
            cuts.append((i, done))
        reach = max([reach, *(last[k] for k in item_keys)])
        done += sizes[i]
    bounds = [0]
    for g in range(1, n):
        target = done * g / n
        later = [c for c in cuts if c[0] > bounds[-1]]
        if later:
            bounds.append(min(later, key=lambda c: abs(c[1] - target))[0])
    bounds.append(len(sizes))
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def run_in_processes(task: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> list[Any]:
    """`task(*call)` for every call, each in a spawned process; the results in call order.

    The first process to fail stops the others (terminated and reaped before this returns, so that the caller can
    remove what they were writing) and is reported in one line: a BridgeError's own message, else the exception's
    type and message, or the exit code of a process that died without a word (killed, out of memory).
    """
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // len(calls))
    links, procs = [], []
    for call in calls:
        receive, send = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=_entry, args=(task, call, send, threads), daemon=True))
        links.append((receive, send))
    results: dict[int, Any] = {}
    try:
        for proc in procs:
            proc.start()
        for _, send in links:
            send.close()  # the child's end: EOF here once the child is gone
        waiting = {receive: i for i, (receive, _) in enumerate(links)}
        while waiting:
            for ready in wait(list(waiting)):
                i = waiting.pop(ready)
                results[i] = _outcome(ready, procs[i])
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join()
    return [results[i] for i in range(len(calls))]


def _outcome(link: Any, proc: Any) -> Any:
    """A process's result, or its failure raised as a BridgeError."""
    try:
        status, value = link.recv()
    except EOFError:
        proc.join()
        raise BridgeError(f"a conversion process died (exit code {proc.exitcode}); nothing was written") from None
    if status != "ok":
        raise BridgeError(value)
    return value


def _entry(task: Callable[..., Any], call: tuple[Any, ...], link: Connection, threads: int) -> None:
    """A process's body: run its share with its part of the cores, send back the result or a one-line failure.
    It dies with the parent (Linux): a parent killed outright leaves no process writing into its output."""
    import torch

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    torch.set_num_threads(threads)
    try:
        link.send(("ok", task(*call)))
    except BridgeError as exc:
        link.send(("error", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops the others
        first = (str(exc).strip().splitlines() or [""])[0]
        link.send(("error", f"{type(exc).__name__}: {first}" if first else type(exc).__name__))
    finally:
        link.close()
