"""Context parallel sweep (suite cp-sweep): `bridge train` at each CP degree with each K/V exchange.

    python bench/run.py cp-sweep                                   # four H100s: 1B shape, seq 32768, CP=1 (DP=4), 2, 4
    python bench/run.py cp-sweep --seq-length 65536                # where CP=1 and CP=2 no longer fit an 80 GB card
    python bench/run.py cp-sweep --nproc 2 --cps 1,2               # two GPUs

CP=1 runs as DP over all GPUs (the same memory per GPU as one GPU); each CP > 1 runs once per exchange (the ring
`p2p`, `all_gather`, `a2a`), the rest of the GPUs as DP. Every run is a fresh `bridge train --compile` from one
seed, so the losses of the exchanges agree; a run that does not fit is reported with its error line and the sweep
goes on. Tokens/s is the median after --warmup steps, for all GPUs together.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench.train import MODELS, train_once, write_config


def configure(p: argparse.ArgumentParser, suite: str) -> None:
    p.add_argument("--model", choices=sorted(MODELS), default="llama-3.2-1b")
    p.add_argument("--seq-length", type=int, default=32768)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=1, help="per DP rank")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--cps", default="1,2,4")
    p.add_argument("--cp-comm-types", default="p2p,all_gather,a2a", help="K/V exchanges to run at CP > 1")
    p.add_argument("--fp8", choices=["tensorwise", "rowwise"], help="FP8 recipe for every run")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--profile", metavar="DIR", help="profile two steps of each run into DIR/<run>")


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = None
    if args.smoke:
        args.model, args.seq_length, args.nproc, args.cps, args.cp_comm_types = "tiny", 64, 2, "2", "p2p"
        args.steps, args.warmup, args.compile, args.global_batch_size, device = 2, 1, False, 2, "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = write_config(args.model, Path(tmp) / "config")
        for cp in (int(c) for c in args.cps.split(",")):
            for exchange in args.cp_comm_types.split(",") if cp > 1 else ["p2p"]:
                name = "cp1" if cp == 1 else f"cp{cp}-{exchange}"
                profile = {} if not args.profile else dict(
                    profile=True, profile_step_start=args.warmup + 1, profile_step_end=args.warmup + 3,
                    tensorboard_dir=str(Path(args.profile) / name))
                r = train_once(args.warmup, catch=True, model_config=str(config_dir), nproc=args.nproc, cp=cp,
                               cp_comm_type=exchange, micro_batch_size=args.micro_batch_size,
                               global_batch_size=args.global_batch_size * (args.nproc // cp),
                               seq_length=args.seq_length, train_iters=args.warmup + args.steps, lr=3e-4, seed=1234,
                               bf16=True, fp8=args.fp8, compile=args.compile, device=device, **profile)
                row = {"run": name, "cp": cp, "dp": args.nproc // cp}
                row.update({"error": r["error"]} if "error" in r else {
                    "tokens_per_s": r["tokens_per_s"], "per_gpu": r["tokens_per_s"] / args.nproc,
                    "peak_gib": r["peak_mem_gib"], "losses": r["losses"]})
                rows.append(row)
                done = row["error"] if "error" in row else f"{row['tokens_per_s']:.0f} tokens/s"
                print(f"{name}: {done}", flush=True)
    return {"model": args.model, "seq_length": args.seq_length, "rows": rows}
