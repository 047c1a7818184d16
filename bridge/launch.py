"""Start N local ranks (spawned processes) with torchrun's environment and collect what each returns.

Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT or a `file://` rendezvous,
initialises torch.distributed (gloo on CPU, NCCL with one GPU per rank),
runs `fn(*args)` and hands its return value back through a file. If one rank fails, the others
are stopped (they would wait forever in a collective) and the first failure is raised.

On TCP the parent hosts the rendezvous store, as torchrun's agent does: it binds port 0 itself and keeps
the socket until the ranks are done (TORCHELASTIC_USE_AGENT_STORE tells every rank to connect as a
client), so concurrent launches on one machine never race for a port.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp

from bridge.errors import BridgeError

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, backend: str, rendezvous: str, threads: int | None, result_dir: str,
            fn: Callable[..., Any], args: Sequence[Any]) -> None:
    import torch.distributed as dist

    from bridge.parallel.state import init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
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
        _report(out, {"ok": False, "error": f"{type(exc).__name__}: {exc}", "is_bridge": isinstance(exc, BridgeError),
                      "traceback": traceback.format_exc(), "time": time.time()})
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bridge-launch-") as tmp:
        rdzv = f"file://{tmp}/rendezvous" if rendezvous == "file" else "tcp"
        store = _host_store(world_size) if rdzv == "tcp" else None
        env = {"MASTER_ADDR": "127.0.0.1"}
        if store is not None:
            env.update(MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True")
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            procs = [ctx.Process(target=_worker, args=(r, world_size, backend, rdzv, threads, tmp, fn, args), daemon=False)
                     for r in range(world_size)]
            for p in procs:
                p.start()
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        try:
            _wait(procs, timeout_s)
        finally:
            del store  # the ranks are gone: close the port
        return _collect(Path(tmp), world_size)


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
        if data["is_bridge"]:
            raise BridgeError(data["error"].removeprefix("BridgeError: "))
        raise RuntimeError(f"rank {rank} of {world_size} failed: {data['error']}\n{data['traceback']}")
    return results
