"""Conversion benchmark: import/export wall time as a ratio to a plain read + torch.save, and peak RSS.

    python bench/convert.py                      # Llama-3.2-1B shape (bf16, ~2.5 GB) and a 2x larger one
    python bench/convert.py --layers 16 --tp 2 --workdir /tmp/bench

Each step runs in a fresh subprocess that reports its own wall time and peak RSS (ru_maxrss), so
one step's memory never hides another's. The baseline reads the same safetensors bytes with
`safetensors.torch.load_file` and writes them with `torch.save` (what a hand-written converter does).
Ratio = baseline time / bridge time: >= 1 means bridge is faster than the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

#: Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json); `--layers` scales the model.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                head_dim=64, vocab_size=128256, tie_word_embeddings=True)

#: Peak RSS is VmHWM from /proc (per address space). ru_maxrss is not used: Linux carries the
#: parent's high-water mark into a child across fork + exec, which would charge the benchmark's own
#: memory to the step.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
{body}
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_rss": hwm * 1024}}))
"""

BASELINE = """
import torch
from pathlib import Path
from safetensors.torch import load_file
src, out = Path(sys.argv[1]), Path(sys.argv[2])
state = {{}}
for shard in sorted(src.glob("*.safetensors")):
    state.update(load_file(shard))
torch.save(state, out / "baseline.pt")
"""


def make_synthetic(folder: Path, layers: int) -> int:
    """A random bf16 Llama-shaped HF folder written tensor by tensor (never whole in memory)."""
    from transformers import LlamaConfig

    from bridge.converters.hf import PlannedTensor, StreamingSafetensorsWriter

    config = LlamaConfig(**LLAMA_1B, num_hidden_layers=layers, architectures=["LlamaForCausalLM"], dtype="bfloat16")
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    with torch.device("meta"):
        from transformers import LlamaForCausalLM
        model = LlamaForCausalLM(config)
    plan = [PlannedTensor(n, torch.bfloat16, tuple(p.shape)) for n, p in model.state_dict().items() if n != "lm_head.weight"]
    writer = StreamingSafetensorsWriter(folder, plan, max_shard_size=2 * 10**9)
    gen = torch.Generator().manual_seed(0)
    for p in plan:
        writer.write(p.name, (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    return sum(p.nbytes for p in plan), max(p.nbytes for p in plan)


def child(body: str, *argv: str) -> dict[str, float]:
    """Run one step in a fresh interpreter, from a cold page cache where the OS lets us drop it.

    Dirty pages of the previous step are flushed and the cache dropped first, so no step pays for
    another's writes or profits from another's reads: every step reads from and writes to the disk.
    """
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root: warm-cache numbers, noisier; the printed table says which
    code = CHILD.format(body=body)
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bridge_step(*argv: str) -> dict[str, float]:
    body = "from bridge.cli.main import main\nassert main(sys.argv[1:]) == 0"
    return child(body, *argv)


def run_size(root: Path, layers: int, tp: int) -> dict[str, object]:
    src, ckpt, hf = root / f"hf-{layers}", root / f"ckpt-{layers}", root / f"out-{layers}"
    total, largest = make_synthetic(src, layers)
    base_dir = root / "baseline"
    base_dir.mkdir(exist_ok=True)
    baseline = child(BASELINE.format(), str(src), str(base_dir))
    shutil.rmtree(base_dir)
    imp = bridge_step("import", str(src), "--out", str(ckpt), "--tp", str(tp))
    exp = bridge_step("export", str(ckpt), "--out", str(hf))
    for path in (src, ckpt, hf):
        shutil.rmtree(path)
    gib = 2**30
    return {
        "layers": layers, "model_gib": total / gib, "largest_tensor_gib": largest / gib,
        "rss_budget_gib": (2 * largest + gib) / gib,
        "baseline_s": baseline["seconds"], "baseline_peak_rss_gib": baseline["peak_rss"] / gib,
        "import_s": imp["seconds"], "import_ratio": baseline["seconds"] / imp["seconds"], "import_peak_rss_gib": imp["peak_rss"] / gib,
        "export_s": exp["seconds"], "export_ratio": baseline["seconds"] / exp["seconds"], "export_peak_rss_gib": exp["peak_rss"] / gib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 32], help="model sizes (Llama-3.2-1B has 16)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bridge-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = [run_size(root, layers, args.tp) for layers in args.layers]
    cold = os.access("/proc/sys/vm/drop_caches", os.W_OK)
    print(f"page cache dropped before each step: {'yes' if cold else 'no (run as root for cold-cache numbers)'}")
    print(f"{'layers':>6} {'model GiB':>9} {'largest':>8} {'budget':>7} | {'base s':>7} {'base RSS':>8} | "
          f"{'import s':>8} {'ratio':>6} {'RSS':>6} | {'export s':>8} {'ratio':>6} {'RSS':>6}")
    for r in rows:
        print(f"{r['layers']:>6} {r['model_gib']:>9.2f} {r['largest_tensor_gib']:>8.2f} {r['rss_budget_gib']:>7.2f} | "
              f"{r['baseline_s']:>7.1f} {r['baseline_peak_rss_gib']:>8.2f} | {r['import_s']:>8.1f} {r['import_ratio']:>6.2f} "
              f"{r['import_peak_rss_gib']:>6.2f} | {r['export_s']:>8.1f} {r['export_ratio']:>6.2f} {r['export_peak_rss_gib']:>6.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
