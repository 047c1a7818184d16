"""`bridge demo`: the whole journey on a built-in tiny model, CPU only."""
from __future__ import annotations

import argparse


def run_demo(args: argparse.Namespace) -> int:
    from bridge.apps.demo import run

    return run(args.workdir, keep=args.keep)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="build a tiny Llama, import at TP=2 PP=2, export, compare logits")
    p.add_argument("--workdir", help="where to put the demo files (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the files after the demo")
    p.set_defaults(func=run_demo)
