"""FP8 against bf16 (suite fp8): tokens/s on one GPU, and loss curves on real text.

    python bench/run.py fp8                              # one H100: 8B shape (8 layers), seq 4096, mbs 4, global batch 8:
                                                         # bf16, --fp8 tensorwise, and with --fp8-output-proj
    python bench/run.py fp8 --model llama-3.2-1b --seq-length 2048
    python bench/run.py fp8 --loss --parallel            # two H100s, side by side: 200 steps on real text, global batch
                                                         # 16, bf16 and FP8 + output layer from one seed
    python bench/run.py fp8 --loss --parallel --variants tensorwise,tensorwise --noise-seed 7   # four GPUs

Variants are `recipe[-format][+out][+ends]`: tensorwise or rowwise, `-e4m3` for e4m3 output gradients, `+out` the
output layer in FP8 too, `+ends` the first and last layer in bf16. Every run is `bridge train --bf16 --compile`
from --seed; --noise-seed adds a bf16 run from another seed (how far two bf16 runs are apart, the scale the FP8
differences are read against). The loss runs train on this repository's .md/.py files and Python's standard
library (12 MB, no download) with a byte-level BPE of 8192 trained on them; lr 2e-4, cosine to 2e-5 after a
quarter of the steps. Loss differences are relative to the bf16 run: `smoothed` compares 20-step moving averages
(the curve as plotted), `final` the means of the last 20 steps. --parallel runs each on its own GPU at once.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from bench.train import MODELS, train_once, write_config

ROOT = Path(__file__).resolve().parents[1]


def text_corpus(out: Path, vocab_size: int, extra: Path | None, max_bytes: int = 12_000_000) -> tuple[Path, Path, int]:
    """(jsonl of real text, tokenizer folder, eos id): this repository's .md/.py files, then those of `extra` up to
    `max_bytes`. A folder that already holds them is reused as it is."""
    from transformers import AutoTokenizer

    from bridge.apps.demo import build_tokenizer

    data = out / "corpus.jsonl"
    if data.exists() and (out / "tokenizer").is_dir():
        return data, out / "tokenizer", int(AutoTokenizer.from_pretrained(out / "tokenizer").eos_token_id)
    roots = [ROOT] + ([extra] if extra else [])
    files = [p for root in roots for p in sorted(p for pat in ("*.md", "*.py") for p in root.rglob(pat))
             if ".git" not in p.parts and p.is_file()]
    texts, size = [], 0
    for p in files:
        if size >= max_bytes:
            break
        texts.append(p.read_text(errors="ignore")[: max_bytes - size])
        size += len(texts[-1])
    out.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t.strip()))
    fast = build_tokenizer(out / "tokenizer", vocab_size, texts)
    return data, out / "tokenizer", int(fast.eos_token_id)


def variant(name: str) -> dict[str, Any]:
    """TrainConfig fields of a variant name, e.g. tensorwise-e4m3 or tensorwise+out+ends."""
    recipe, *extras = name.split("+")
    unknown = set(extras) - {"out", "ends"}
    if unknown:
        raise SystemExit(f"unknown FP8 variant suffix +{sorted(unknown)[0]} in {name}: only +out and +ends")
    return {**dict(zip(("fp8", "fp8_format"), recipe.split("-"))), "fp8_output_proj": "out" in extras,
            "first_last_layers_bf16": "ends" in extras}


def _smooth(losses: list[float], window: int = 20) -> list[float]:
    window = min(window, len(losses))
    return [statistics.mean(losses[i - window:i]) for i in range(window, len(losses) + 1)]


def compare_losses(losses: list[float], base: list[float]) -> dict[str, Any]:
    """How far a loss curve is from `base` (same steps): the largest relative gap of their 20-step moving averages, how
    many of those windows differ by more than 1%, and the relative gap of the means of the last 20 steps."""
    tail = slice(-min(20, len(losses)), None)
    windows = [a / b - 1 for a, b in zip(_smooth(losses), _smooth(base))]
    return {"smoothed_max_%": 100 * max(abs(w) for w in windows),
            "windows_over_1%": f"{sum(abs(w) > 0.01 for w in windows)}/{len(windows)}",
            "final_%": 100 * abs(statistics.mean(losses[tail]) / statistics.mean(base[tail]) - 1)}


def compare(row: dict[str, Any], base: dict[str, Any]) -> None:
    """Add to `row` its speed-up and loss differences against the bf16 run `base` (same seed and data)."""
    if "error" in row or "error" in base or row is base:
        return
    row["vs_bf16"] = row["tokens_per_s"] / base["tokens_per_s"]
    row.update(compare_losses(row["losses"], base["losses"]))


def configure(p: argparse.ArgumentParser, suite: str) -> None:
    p.add_argument("--loss", action="store_true", help="loss curves on real text (defaults: 200 steps, global batch 16)")
    p.add_argument("--model", choices=sorted(MODELS), default="llama-8b-8l")
    p.add_argument("--layers", type=int)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, help="default 4; 2 with --loss")
    p.add_argument("--global-batch-size", type=int, help="default 8; 16 with --loss")
    p.add_argument("--steps", type=int, help="timed steps: default 6; 200 with --loss")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", help="comma-separated FP8 variants (default tensorwise,tensorwise+out; with --loss "
                                      "tensorwise+out); empty: bf16 only")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--noise-seed", type=int, help="also train bf16 from this seed")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--extra-text", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                   help="more .py/.md text for --loss (default: Python's standard library)")
    p.add_argument("--corpus", type=Path, help="folder for the text and tokenizer, built once and reused")
    p.add_argument("--parallel", action="store_true", help="each run on its own GPU, all at once")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--only", help=argparse.SUPPRESS)  # one run of the list (what --parallel starts per GPU)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BF16_JSON", "OTHER_JSON"),
                   help="compare the rows of two earlier runs' JSON (made side by side elsewhere), then stop")


def _runs(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    runs = [("bf16", {})] + [(f"fp8-{v}" + (f"#{i}" if args.variants.split(",")[:i].count(v) else ""), variant(v))
                             for i, v in enumerate(args.variants.split(",")) if v]
    return runs + ([(f"bf16-seed{args.noise_seed}", {"seed": args.noise_seed})] if args.noise_seed is not None else [])


def _side_by_side(args: argparse.Namespace, runs: list[tuple[str, dict[str, Any]]], tmp: Path) -> list[dict[str, Any]]:
    """Each run as its own `bench/run.py fp8 --only NAME` on its own GPU, all at once; their rows."""
    import torch

    if len(runs) > torch.cuda.device_count():
        raise SystemExit(f"--parallel needs {len(runs)} GPUs, this machine has {torch.cuda.device_count()}")
    common = ["fp8", "--model", args.model, "--seq-length", str(args.seq_length), "--micro-batch-size",
              str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--seed", str(args.seed), "--lr", str(args.lr), "--variants", args.variants,
              *(["--layers", str(args.layers)] if args.layers else []), *([] if args.compile else ["--no-compile"]),
              *(["--noise-seed", str(args.noise_seed)] if args.noise_seed is not None else []),
              *(["--loss", "--corpus", str(args.corpus)] if args.loss else [])]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "bench" / "run.py"), *common, "--only", name,
                               "--json", str(tmp / f"{i}.json")], env={**os.environ, "CUDA_VISIBLE_DEVICES": str(i)})
             for i, (name, _) in enumerate(runs)]
    for proc in procs:
        proc.wait()
    return [json.loads((tmp / f"{i}.json").read_text())["rows"][0] if (tmp / f"{i}.json").is_file()
            else {"run": name, "error": "the run failed (its output is above)"} for i, (name, _) in enumerate(runs)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.compare:
        base, *_ = (json.loads(args.compare[0].read_text())["rows"])
        rows = [base] + json.loads(args.compare[1].read_text())["rows"]
        for row in rows[1:]:
            compare(row, base)
        return {"rows": rows}
    loss, device, max_bytes = args.loss, None, 12_000_000
    if args.smoke:  # the real-text path and the comparison, bf16 only: FP8 needs an H100
        args.model, args.seq_length, args.warmup, args.compile, device, max_bytes = "tiny", 64, 1, False, "cpu", 200_000
        args.micro_batch_size, args.global_batch_size, args.steps, args.variants = 1, 2, 3, ""
        args.noise_seed, loss = 7, True
    args.micro_batch_size = args.micro_batch_size or (2 if loss else 4)
    args.global_batch_size = args.global_batch_size or (16 if loss else 8)
    args.steps = args.steps or (200 if loss else 6)
    args.variants = ("tensorwise+out" if loss else "tensorwise,tensorwise+out") if args.variants is None else args.variants
    runs = [r for r in _runs(args) if args.only in (None, r[0])]
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = write_config(args.model, Path(tmp) / "config", args.layers)
        data = {}
        if loss:
            args.corpus = args.corpus or Path(tmp) / "text"
            path, tokenizer, eos = text_corpus(args.corpus, min(8192, MODELS[args.model]["vocab_size"]),
                                               None if args.smoke else args.extra_text, max_bytes)
            write_config(args.model, config_dir, args.layers, eos_token_id=eos)
            data = dict(data_path=[str(path)], tokenizer=str(tokenizer), split="100,0,0", lr_decay_style="cosine",
                        min_lr=args.lr / 10, lr_warmup_iters=args.steps // 4)
        if args.parallel and not args.only:
            rows = _side_by_side(args, runs, Path(tmp))
        else:
            rows = []
            for name, kw in runs:
                r = train_once(args.warmup, catch=True, model_config=str(config_dir), nproc=None if args.smoke else 1,
                               micro_batch_size=args.micro_batch_size,
                               global_batch_size=args.global_batch_size, seq_length=args.seq_length,
                               train_iters=args.warmup + args.steps, lr=args.lr, bf16=True, compile=args.compile,
                               device=device, **{"seed": args.seed, **data, **kw})
                rows.append({"run": name, **({"error": r["error"]} if "error" in r else {
                    "tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_mem_gib"], "losses": r["losses"]})})
                print(f"{name}: " + (r["error"] if "error" in r else f"{r['tokens_per_s']:.0f} tokens/s"), flush=True)
    if rows and rows[0]["run"] == "bf16":
        for row in rows[1:]:
            compare(row, rows[0])
    return {"model": args.model, "seq_length": args.seq_length, "loss": loss, "rows": rows}
