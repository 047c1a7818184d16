"""Where the GPU time of a profiled step goes: a Chrome trace from `bridge train --profile` -> a short table.

    python bench/trace_summary.py runs/prof/profile_rank0.json [--steps 2] [--top 25]

Prints the wall span of the kernels, how much of it some kernel was running (busy) and how much the GPU
idled (waiting for the CPU or a host sync), then the device time per kernel family (matmul, attention,
Triton kernels that torch.compile generated, the optimizer, communication, other ATen kernels) and the
most expensive kernels. The profiler's own table (profile_rank*.txt) sorts operators; this one answers
"is the step bound by matmuls, by elementwise work or by idling?".
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

FAMILIES: list[tuple[str, re.Pattern[str]]] = [
    ("communication", re.compile(r"nccl|allreduce|allgather|reducescatter", re.I)),
    ("attention", re.compile(r"cudnn|fmha|flash|attention|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|sm80_|cublas", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("triton (torch.compile)", re.compile(r"^triton_|^Triton", re.I)),
    ("memset/memcpy", re.compile(r"^Memset|^Memcpy|memset|memcpy", re.I)),
]


def family(name: str) -> str:
    """The first family whose pattern matches a kernel name (table order decides overlaps), else 'other ATen'."""
    return next((fam for fam, pattern in FAMILIES if pattern.search(name)), "other ATen")


def gpu_events(trace: dict) -> list[dict]:
    """Kernel, memcpy and memset events (the ones that occupy the GPU)."""
    keep = {"kernel", "gpu_memcpy", "gpu_memset"}
    return [e for e in trace.get("traceEvents", []) if e.get("cat") in keep and e.get("ph") == "X"]


def busy_time(events: list[dict]) -> float:
    """Length of the union of the events' intervals (µs): overlapping streams count once."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def largest_gaps(events: list[dict], count: int) -> list[tuple[float, float, str, str]]:
    """The `count` longest stretches with no GPU event running: (start after the first event, length, the
    event that ended before, the one that started after), in µs, sorted by time."""
    ordered = sorted(events, key=lambda e: e["ts"])
    origin, gaps, end, last = ordered[0]["ts"], [], ordered[0]["ts"] + ordered[0]["dur"], ordered[0]["name"]
    for e in ordered[1:]:
        if e["ts"] > end:
            gaps.append((end - origin, e["ts"] - end, last, e["name"]))
        if e["ts"] + e["dur"] >= end:
            end, last = e["ts"] + e["dur"], e["name"]
    return sorted(sorted(gaps, key=lambda g: -g[1])[:count])


def summarize(path: Path, steps: int, top: int) -> str:
    events = gpu_events(json.loads(path.read_text()))
    if not events:
        return f"{path}: no GPU kernels in the trace (a CPU run?)"
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    busy = busy_time(events)
    per_family: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        per_family[family(e["name"])] += e["dur"]
        per_kernel[e["name"]][0] += e["dur"]
        per_kernel[e["name"]][1] += 1
    ms = lambda us: us / 1000 / steps  # noqa: E731  (per step)
    lines = [f"per step: span {ms(span):.1f} ms, GPU busy {ms(busy):.1f} ms, idle {ms(span - busy):.1f} ms "
             f"({100 * (span - busy) / span:.1f}%)", "", f"{'family':<24}{'ms/step':>10}{'share':>8}"]
    for fam, us in sorted(per_family.items(), key=lambda kv: -kv[1]):
        lines.append(f"{fam:<24}{ms(us):>10.2f}{100 * us / busy:>7.1f}%")
    lines += ["", "largest idle gaps (ms after the first kernel: gap ms, kernel before -> kernel after):"]
    for at, gap, before, after in largest_gaps(events, 12):
        lines.append(f"  {at / 1000:9.2f}: {gap / 1000:6.2f}  {before[:50]} -> {after[:50]}")
    lines += ["", f"{'ms/step':>9}{'calls':>7}  kernel"]
    for name, (us, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{ms(us):>9.2f}{n // steps:>7}  {name[:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path)
    p.add_argument("--steps", type=int, default=2, help="profiled steps in the trace (bench/train.py profiles 2)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    print(summarize(args.trace, args.steps, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
