"""Start N local ranks with torchrun's environment and collect what each returns.

CPU (gloo) ranks are forked from a multiprocessing fork server that has imported torch and bridge once
(`bridge.rank_server`), so starting them costs milliseconds however many there are; NCCL ranks are spawned
(`_rank_context` says why). Each gets the launcher's environment as it is at the launch, plus RANK /
WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT or a `file://` rendezvous, initialises
torch.distributed (gloo on CPU, NCCL with one GPU per rank), runs `fn(*args)` and hands its return value
back through a file. If one rank fails, the others are stopped (they would wait forever in a collective)
and the first failure is raised.

On TCP the parent hosts the rendezvous store, as torchrun's agent does: it binds port 0 itself and keeps
the socket until the ranks are done (TORCHELASTIC_USE_AGENT_STORE tells every rank to connect as a
client), so concurrent launches on one machine never race for a port.

Ranks never outlive the launcher: a thread in each waits on the launcher's pidfd (Linux; elsewhere it
polls the pid) and exits the rank when the launcher is gone, and a spawned rank also asks the kernel to
kill it with its parent (PR_SET_PDEATHSIG); so a launcher killed by SIGKILL or the OOM killer does not
leave ranks training. Ctrl-C stops every rank quietly and the launcher raises KeyboardInterrupt once:
ranks start with SIGINT ignored and take it as KeyboardInterrupt once their worker runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import select
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.multiprocessing as mp

from bridge.errors import BridgeError
from bridge.parallel.state import init_distributed
from bridge.processes import process_alive

log = logging.getLogger(__name__)

#: prctl(2) option: the signal this process gets when its parent dies.
_PR_SET_PDEATHSIG = 1
#: Seconds between launcher checks where there is no pidfd to wait on (not Linux).
_PARENT_POLL_S = 0.5
#: Seconds interrupted ranks get to exit before they are killed.
_INTERRUPT_GRACE_S = 5.0


def _die_with_launcher(launcher: int) -> None:
    """Exit when the launcher dies, whatever killed it: a rank left alone would train on (and hold its GPU).
    A spawned rank's parent is the launcher: the kernel kills it with its parent (PR_SET_PDEATHSIG, Linux), even
    while it is stuck in C code. A forked rank's parent is the fork server, which lives on while any rank does (each
    holds the server's keep-alive pipe): a thread watches the launcher itself, for every rank."""
    if sys.platform.startswith("linux") and os.getppid() == launcher:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    threading.Thread(target=_watch_launcher, args=(launcher,), daemon=True, name="bridge-launcher-watch").start()


def _watch_launcher(launcher: int) -> None:
    try:
        handle = os.pidfd_open(launcher)  # readable once the launcher has exited, reaped or not
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux): poll
        while process_alive(launcher):
            time.sleep(_PARENT_POLL_S)
        os._exit(1)
    select.select([handle], [], [])
    os._exit(1)


def _interrupt_once(signum: int, frame: object) -> None:
    """Ctrl-C reaches a rank twice (the terminal's process group, then the launcher): act on the first only."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _worker(rank: int, world: int, backend: str, rendezvous: str, threads: int | None, result_dir: str,
            launcher: int, interruptible: bool, env: dict[str, str], fn: Callable[..., Any], args: Sequence[Any]) -> None:
    import torch.distributed as dist

    _die_with_launcher(launcher)
    signal.signal(signal.SIGINT, _interrupt_once if interruptible else signal.SIG_IGN)
    os.environ.clear()  # the fork server's environment is the launcher's at the first launch: take today's
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if threads:
        torch.set_num_threads(threads)
    out = Path(result_dir) / f"rank{rank}.pt"
    try:
        if rendezvous.startswith("file://"):
            if backend == "nccl":
                torch.cuda.set_device(rank)
            dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world)
        else:
            init_distributed(backend)
        result = fn(*args)
        _report(out, {"ok": True, "result": result})
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        try:
            _report(out, _failure(exc))
        except KeyboardInterrupt:  # Ctrl-C while reporting another error (a peer that stopped first): same end
            exc = KeyboardInterrupt()
            _report(out, _failure(exc))
        if isinstance(exc, KeyboardInterrupt):
            # stop now: the interpreter's exit would wait for gloo threads that wait on peers stopping as well
            sys.stderr.flush()
            os._exit(1)
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _failure(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "is_bridge": isinstance(exc, BridgeError),
            "interrupted": isinstance(exc, KeyboardInterrupt), "traceback": traceback.format_exc(), "time": time.time()}


def _report(path: Path, data: dict[str, Any]) -> None:
    """A rank's result for the parent. Plain pickle: this is inter-process messaging between our own
    processes through a private temporary folder, not a checkpoint (those go through weights_only loads)."""
    with path.open("wb") as f:
        pickle.dump(data, f)


def launch(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", rendezvous: str = "tcp",
           threads: int | None = None, timeout_s: float = 1800.0) -> list[Any]:
    """Run `fn(*args)` on `world_size` spawned ranks; return the per-rank results in rank order.

    `fn` must be importable (a module-level function). `rendezvous` is "tcp" (a store this process serves on a
    port of its own) or "file". `threads` caps torch's intra-op threads per rank (default: CPU cores / ranks on gloo).
    """
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise BridgeError(f"{world_size} ranks need {world_size} GPUs, found {torch.cuda.device_count()}; "
                          "use fewer ranks or --device cpu")
    if threads is None and backend == "gloo":
        threads = max(1, (os.cpu_count() or 1) // world_size)
    ctx = _rank_context(backend)
    with tempfile.TemporaryDirectory(prefix="bridge-launch-") as tmp:
        rdzv = f"file://{tmp}/rendezvous" if rendezvous == "file" else "tcp"
        store = _host_store(world_size) if rdzv == "tcp" else None
        env = {"MASTER_ADDR": "127.0.0.1"}
        if store is not None:
            env.update(MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True")
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with _sigint_ignored() as interruptible:
                procs = [ctx.Process(target=_worker, args=(r, world_size, backend, rdzv, threads, tmp, os.getpid(),
                                                           interruptible, dict(os.environ), fn, args), daemon=False)
                         for r in range(world_size)]
                for p in procs:
                    p.start()
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        try:
            _wait(procs, timeout_s)
        except KeyboardInterrupt:
            _interrupt(procs)
            raise
        finally:
            del store  # the ranks are gone: close the port
        return _collect(Path(tmp), world_size)


def _rank_context(backend: str) -> Any:
    """The fork server's context, with `bridge.rank_server` preloaded, for gloo ranks; the server is one per launcher
    process and outlives a launch, so later launches start at once. NCCL ranks are spawned: a CUDA driver that any
    import initialised in the server would be unusable in the ranks forked from it, and the forked path has not run
    on GPUs yet (a GPU job starts its ranks once, so it gains little)."""
    if backend != "gloo" or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["bridge.rank_server"])
    return context


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[bool]:
    """Ignore SIGINT while ranks start (and the fork server, the first time), so they inherit it ignored; yields whether Ctrl-C applies at all (a
    launcher that ignores SIGINT itself, e.g. a background job of a script, keeps its ranks ignoring it)."""
    if threading.current_thread() is not threading.main_thread():
        yield signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield previous is not signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt(procs: list[Any]) -> None:
    """Ctrl-C in the launcher: pass it on to the ranks (a SIGINT sent to the launcher alone must stop them too),
    give them a moment to exit, then kill what is left (a rank still starting up ignores SIGINT)."""
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGINT)
    deadline = time.monotonic() + _INTERRUPT_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def _host_store(world_size: int) -> Any:
    """The ranks' TCP rendezvous store, served from this process on a port the OS picks and nobody else can take."""
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=timedelta(seconds=600),
                         wait_for_workers=False)


def _wait(procs: list[Any], timeout_s: float) -> None:
    """Wait for all ranks; once one fails, give the others a moment to report, then stop them."""
    deadline = time.monotonic() + timeout_s
    failed_at: float | None = None
    while any(p.is_alive() for p in procs):
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = time.monotonic()
        if (failed_at is not None and time.monotonic() - failed_at > 5) or time.monotonic() > deadline:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(10)
            break
        time.sleep(0.05)
    for p in procs:
        p.join()


def _collect(folder: Path, world_size: int) -> list[Any]:
    results, errors = [], []
    for rank in range(world_size):
        path = folder / f"rank{rank}.pt"
        if not path.is_file():
            errors.append((rank, {"error": "stopped before reporting (killed, or waiting on a failed rank)",
                                  "is_bridge": False, "traceback": ""}))
            results.append(None)
            continue
        with path.open("rb") as f:
            data = pickle.load(f)  # written by our own rank process into our private temp folder
        if data["ok"]:
            results.append(data["result"])
        else:
            errors.append((rank, data))
            results.append(None)
    if errors:
        # the first failure in time is the cause; later ones are peers seeing the connection drop
        rank, data = min(errors, key=lambda e: e[1].get("time", float("inf")))
        log.debug("rank %d traceback:\n%s", rank, data["traceback"])
        if data.get("interrupted"):
            raise KeyboardInterrupt
        if data["is_bridge"]:
            raise BridgeError(data["error"].removeprefix("BridgeError: "))
        raise RuntimeError(f"rank {rank} of {world_size} failed: {data['error']}\n{data['traceback']}")
    return results
