"""Context parallel and FP8 benchmarks of `bridge train` (issue 9): tokens/s and peak memory, losses side by side.

CP sweep, 1B shape at seq 32768 on 4 GPUs (CP=1 is DP=4: the same per-GPU memory as one GPU), each CP > 1 with
the ring (p2p) and the all-gather:
    python bench/cp_fp8.py cp --model llama-3.2-1b --seq-length 32768 --nproc 4 --cps 1,2,4
FP8 vs bf16 on one GPU, on real text (this repository's docs and code, byte-level BPE trained on them):
    python bench/cp_fp8.py fp8 --model llama-8b-8l --seq-length 4096 --steps 200 --recipes tensorwise,rowwise
CPU smoke test (tiny model, CP=2 over 2 gloo ranks, real-text data path, bf16 only):
    python bench/cp_fp8.py --smoke

Every run is a fresh `bridge train` (spawned ranks); a run that fails (e.g. out of memory) is reported as
such with its error line instead of stopping the sweep. Tokens/s is the median after --warmup steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import _device_name, write_config  # noqa: E402 - bench/train.py's model shapes

ROOT = Path(__file__).resolve().parents[1]


def text_corpus(out: Path, vocab_size: int = 8192, extra: Path | None = None,
                max_bytes: int = 12_000_000) -> tuple[Path, Path, int]:
    """(jsonl of real text, tokenizer folder, eos id): this repository's .md/.py files, then those of `extra`
    (e.g. Python's standard library, ~30 MB on any machine) up to `max_bytes`: text that needs no network.
    A folder that already holds them (an earlier call's `out`) is reused as it is."""
    from transformers import AutoTokenizer

    from bridge.demo import build_tokenizer

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
        texts.append(p.read_text(errors="ignore"))
        size += len(texts[-1])
    out.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t.strip()))
    fast = build_tokenizer(out / "tokenizer", vocab_size, texts)
    return data, out / "tokenizer", int(fast.eos_token_id)


def run(config_dir: Path, args: argparse.Namespace, *, cp: int = 1, cp_comm_type: str = "p2p", fp8: str | None = None,
        fp8_format: str | None = None, fp8_output_proj: bool = False, first_last_layers_bf16: bool = False,
        data: Path | None = None,
        tokenizer: Path | None = None, seed: int | None = None) -> dict:
    """One bridge train run -> tokens/s, peak memory, loss curve (or the error that stopped it)."""
    from bridge.training import TrainConfig, train

    dp = args.nproc // cp
    cfg = TrainConfig(model_config=str(config_dir), mock_data=data is None, data_path=[str(data)] if data else [],
                      tokenizer=str(tokenizer) if tokenizer else None, split="100,0,0", nproc=args.nproc, cp=cp,
                      cp_comm_type=cp_comm_type,
                      micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size * dp,
                      seq_length=args.seq_length, train_iters=args.warmup + args.steps, lr=args.lr,
                      min_lr=args.lr / 10, lr_warmup_iters=args.steps // 4, lr_decay_style="cosine",
                      seed=args.seed if seed is None else seed,
                      bf16=True, fp8=fp8, fp8_format=fp8_format, fp8_output_proj=fp8_output_proj,
                      first_last_layers_bf16=first_last_layers_bf16,
                      recompute=args.recompute, compile=args.compile, eval_interval=0,
                      progress=False, device=args.device, **_profiling(args, cp, cp_comm_type))
    try:
        summary = train(cfg)
    except Exception as exc:  # noqa: BLE001 - a sweep point that does not fit is a result, not a crash
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[-1][:300] if str(exc) else ''}"}
    records = summary["records"][args.warmup:]
    step = statistics.median(r["step_s"] for r in records)
    mem = [r["peak_mem_gib"] for r in records if r["peak_mem_gib"] is not None]
    return {"tokens_per_s": cfg.global_batch_size * cfg.seq_length / step, "peak_mem_gib": max(mem) if mem else None,
            "losses": [r["loss"] for r in summary["records"]]}


def _profiling(args: argparse.Namespace, cp: int, cp_comm_type: str) -> dict:
    """TrainConfig fields for --profile: two steps after the warm-up, rank 0, into DIR/cp<N>-<exchange>."""
    if not args.profile:
        return {}
    return dict(profile=True, profile_step_start=args.warmup + 1, profile_step_end=args.warmup + 3,
                tensorboard_dir=str(Path(args.profile) / f"cp{cp}-{cp_comm_type}"))


def cp_sweep(config_dir: Path, args: argparse.Namespace) -> dict:
    """Each CP degree with each K/V exchange (CP=1 has none); the losses show that the exchanges agree."""
    out = {}
    for cp in [int(c) for c in args.cps.split(",")]:
        for exchange in args.cp_comm_types.split(",") if cp > 1 else ["p2p"]:
            name = f"cp{cp}" if cp == 1 else f"cp{cp}-{exchange}"
            out[name] = run(config_dir, args, cp=cp, cp_comm_type=exchange, fp8=args.cp_fp8)
            print(f"{name}: {_fmt(out[name])}  losses {out[name].get('losses')}", flush=True)
    return out


def fp8_compare(config_dir: Path, args: argparse.Namespace, data: Path, tokenizer: Path) -> dict:
    """bf16, then each FP8 recipe from the same seed; with --noise-seed also bf16 from another seed, whose
    distance to the first bf16 run is the run-to-run spread the FP8 differences should be read against."""
    out = {}
    if not args.skip_bf16:
        out["bf16"] = run(config_dir, args, data=data, tokenizer=tokenizer)
        print(f"bf16: {_fmt(out['bf16'])}", flush=True)
    variants = [(f"fp8-{r}", _fp8_variant(r)) for r in args.recipes.split(",") if r]
    if args.noise_seed is not None:
        variants.append((f"bf16-seed{args.noise_seed}", dict(seed=args.noise_seed)))
    for name, kw in variants:
        out[name] = run(config_dir, args, data=data, tokenizer=tokenizer, **kw)
        if "bf16" in out:
            compare(out[name], out["bf16"])
        print(f"{name}: {_fmt(out[name])}", flush=True)
    return out


def _fp8_variant(name: str) -> dict:
    """run() arguments for an FP8 variant name: recipe[-format][+out][+ends], e.g. tensorwise-e4m3 or
    tensorwise+out+ends (+out: the output layer in FP8 too; +ends: the first and last layer in bf16)."""
    recipe, *extras = name.split("+")
    unknown = set(extras) - {"out", "ends"}
    if unknown:
        raise SystemExit(f"unknown FP8 variant suffix +{sorted(unknown)[0]} in {name}: only +out and +ends")
    return {**dict(zip(("fp8", "fp8_format"), recipe.split("-"))), "fp8_output_proj": "out" in extras,
            "first_last_layers_bf16": "ends" in extras}


def compare(r: dict, base: dict) -> None:
    """Add to run `r` its speed-up and loss differences against the bf16 run `base` (same seed and data)."""
    if "error" in r or "error" in base:
        return
    r["speedup_vs_bf16"] = r["tokens_per_s"] / base["tokens_per_s"]
    r["max_rel_loss_diff"] = max(abs(a - b) / b for a, b in zip(r["losses"], base["losses"]))
    tail = slice(-min(20, len(r["losses"])), None)  # the end of the curve, averaged over 20 steps
    r["final_rel_loss_diff"] = abs(statistics.mean(r["losses"][tail]) / statistics.mean(base["losses"][tail]) - 1)
    r["smoothed_max_rel_loss_diff"] = max(abs(a / b - 1) for a, b in zip(_smooth(r["losses"]), _smooth(base["losses"])))


def compare_files(base_json: Path, other_json: Path) -> dict:
    """The FP8 comparison of two --json results run side by side (bf16 on one GPU, the variants on another)."""
    base = json.loads(base_json.read_text())["fp8"]["bf16"]
    others = json.loads(other_json.read_text())["fp8"]
    for name, r in others.items():
        compare(r, base)
        print(f"{name}: {_fmt(r)}", flush=True)
    return {"bf16": base, **others}


def _smooth(losses: list[float], window: int = 20) -> list[float]:
    """Moving average over `window` steps (the loss curve as a plot shows it), from step `window` on; a run shorter
    than the window is averaged whole."""
    window = min(window, len(losses))
    return [statistics.mean(losses[i - window:i]) for i in range(window, len(losses) + 1)]


def _fmt(r: dict) -> str:
    if "error" in r:
        return f"FAILED ({r['error']})"
    extra = "".join(f"  {k} {r[k]:.3f}" for k in ("speedup_vs_bf16", "max_rel_loss_diff", "smoothed_max_rel_loss_diff",
                                                     "final_rel_loss_diff") if k in r)
    mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f} GiB"
    return f"{r['tokens_per_s']:.0f} tokens/s, peak {mem}{extra}"


def main(argv: list[str] | None = None) -> int:
    from train import MODELS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["cp", "fp8"], default="cp")
    p.add_argument("--model", choices=sorted(MODELS), default="llama-3.2-1b")
    p.add_argument("--seq-length", type=int, default=32768)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=1, help="per DP rank")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--cps", default="1,2,4")
    p.add_argument("--cp-comm-types", default="p2p,all_gather,a2a", help="K/V exchanges to sweep at CP > 1")
    p.add_argument("--cp-fp8", choices=["tensorwise", "rowwise"], help="FP8 recipe for every run of the CP sweep")
    p.add_argument("--recipes", default="tensorwise,rowwise", help="FP8 variants: recipe[-format][+out][+ends], e.g. "
                                                                     "tensorwise-e4m3, tensorwise+out+ends")
    p.add_argument("--seed", type=int, default=1234, help="initialisation and data order of every run")
    p.add_argument("--noise-seed", type=int, help="also train bf16 from this seed: the run-to-run loss spread")
    p.add_argument("--extra-text", type=Path, help="more real text (.py/.md) for the FP8 runs, e.g. Python's stdlib")
    p.add_argument("--corpus", type=Path, help="folder for the text and tokenizer, built once and reused: runs side by "
                                                "side on one host then share it instead of each training a tokenizer")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--recompute", choices=["full", "selective"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--profile", metavar="DIR", help="profile two steps after the warm-up of each run into DIR")
    p.add_argument("--skip-bf16", action="store_true", help="run only the variants (the bf16 run is elsewhere)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BF16_JSON", "VARIANTS_JSON"),
                   help="compare two --json results of runs made side by side, then exit")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: CP=1,2 and the real-text data path")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    args.device = None
    if args.compare:
        result = compare_files(*args.compare)
        for r in result.values():
            r.pop("losses", None)
        print(json.dumps(result))
        return 0
    if args.smoke:
        args.model, args.seq_length, args.nproc, args.cps, args.steps, args.warmup = "tiny", 64, 2, "1,2", 2, 1
        args.device, args.global_batch_size, args.micro_batch_size = "cpu", 2, 1
    results: dict = {"what": args.what, "model": args.model, "seq_length": args.seq_length, "device": _device_name()}
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = write_config(args.model, Path(tmp) / "config")
        if args.what == "cp" or args.smoke:
            results["cp"] = cp_sweep(config_dir, args)
        if args.what == "fp8" or args.smoke:
            data, tokenizer, eos = text_corpus(args.corpus or Path(tmp) / "text",
                                               min(8192, MODELS[args.model]["vocab_size"]), args.extra_text)
            config = json.loads((config_dir / "config.json").read_text())
            (config_dir / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
            if args.smoke:
                args.recipes, args.nproc = "", 1  # FP8 needs an H100: the smoke run checks the bf16 side
            results["fp8"] = fp8_compare(config_dir, args, data, tokenizer)
    for part in results.get("fp8", {}).values():
        part.pop("losses", None) if not args.json else None
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items()}, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
