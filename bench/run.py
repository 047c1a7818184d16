"""bridge's benchmarks, one entry point: `python bench/run.py <suite> [--smoke] [suite options]`.

    python bench/run.py --list                      # the suites and what each measures
    python bench/run.py train-1gpu                  # one H100: bridge train against HF transformers + torch.compile
    python bench/run.py cp-sweep --help             # a suite's options
    python bench/run.py convert --smoke             # CPU, tiny shapes, seconds: checks the suite's code, measures nothing

Every suite prints a table and writes its rows as JSON (`--json PATH`, default bench-out/<suite>.json) with the
device, torch version and the options it ran with. Ratios compare runs made by the same invocation on the same
machine. docs/performance.md holds the current results and the command behind each.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# The suites import each other as bench.<module>, never by bare name: bench/ itself leaves the path, so that none
# of its modules shadows an installed package for this process or the ranks it spawns.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: suite -> (module in bench/, what it measures). A module suite has `configure(parser, suite)` and `run(args)`;
#: a script suite (journey, checkpoint) is its own program, run with the arguments given.
SUITES: dict[str, tuple[str, str]] = {
    "convert": ("convert", "CPU: import/export time against safetensors + torch.save, peak RSS; --moe: DeepSeek-V3 shape"),
    "data": ("data", "CPU: `bridge data prepare` tokens/s against the tokenizer called directly"),
    "train-1gpu": ("train", "one GPU: bridge train against HF transformers + torch.compile + fused AdamW"),
    "layouts-4gpu": ("train", "four GPUs: 8B shape (8 layers), tokens/s and MFU per parallel layout"),
    "cp-sweep": ("cp", "GPUs: context parallel degrees x K/V exchanges at a long sequence, tokens/s and memory"),
    "packing-1gpu": ("packing", "one GPU: packed SFT real tokens/s against padding per sample and against no attention reset"),
    "learning-1gpu": ("learning", "one GPU: bridge and HF from the same checkpoint on the same tokens, loss curves over 300 steps"),
    "fp8": ("fp8", "one GPU: FP8 against bf16, speed; --loss: loss curves on real text"),
    "moe": ("moe", "four GPUs: Mixtral-shaped MoE training, tokens/s and MFU per expert-parallel layout"),
    "kernels": ("microbench", "one GPU (ring: several): attention backends, RoPE kernels, context-parallel attention"),
    "lora-1gpu": ("lora", "one GPU: LoRA r=16 on all linears of the Llama-3.1-8B shape against HF + peft + torch.compile"),
    "weights-1gpu": ("stream", "one GPU: export_hf_weights from a live 8B-shaped model into a preallocated consumer, GB/s"),
    "journey": ("journey.py", "one GPU: the whole user journey at real size, every step a `bridge` command"),
    "checkpoint": ("checkpoint.py", "one GPU: checkpoint saves during training, memory, save time, async stall"),
}


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned text table; columns in first-seen order, lists and dicts (loss curves) left out."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, (list, dict))]
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the suites")
    sub = p.add_subparsers(dest="suite", metavar="SUITE")
    for name, (module, help_text) in SUITES.items():
        sp = sub.add_parser(name, help=help_text, description=help_text, add_help=not module.endswith(".py"))
        if module.endswith(".py"):
            sp.add_argument("rest", nargs=argparse.REMAINDER, help=f"arguments of bench/{module}")
            continue
        sp.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the suite's code in seconds")
        sp.add_argument("--json", type=Path, help=f"where the rows go (default bench-out/{name}.json)")
        importlib.import_module(f"bench.{module}").configure(sp, name)
    return p


def run_script(script: str, argv: list[str]) -> int:
    """A suite that is its own program (it prints its table and writes its JSON itself)."""
    path = BENCH / script
    if not path.is_file():
        print(f"bench/{script} is not in this checkout", file=sys.stderr)
        return 2
    return subprocess.run([sys.executable, str(path), *argv], cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUITES and SUITES[argv[0]][0].endswith(".py"):
        return run_script(SUITES[argv[0]][0], argv[1:])
    args = parser().parse_args(argv)
    if args.list or not args.suite:
        width = max(map(len, SUITES))
        print("\n".join(f"{name:<{width}}  {help_text}" for name, (_, help_text) in SUITES.items()))
        return 0
    import torch

    module = importlib.import_module(f"bench.{SUITES[args.suite][0]}")
    result = module.run(args)
    rows = result.pop("rows")
    out = {"suite": args.suite, "device": device_name(), "torch": torch.__version__, "smoke": args.smoke,
           "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("list",)},
           **result, "rows": rows}
    print(f"\n{args.suite} on {out['device']}, torch {out['torch']}" + (" (smoke: no measurement)" if args.smoke else ""))
    print(table(rows))
    path = args.json or Path("bench-out") / f"{args.suite}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"rows written to {path}")
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
