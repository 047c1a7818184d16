"""Conversion (suite convert): `bridge import` / `bridge export` wall time and peak memory, on the CPU.

    python bench/run.py convert                    # Llama-3.2-1B shape (bf16, 2.3 GiB) and a 2x deeper one, TP=2
    python bench/run.py convert --layers 16 --tp 4 --workdir /scratch/bench
    python bench/run.py convert --moe              # DeepSeek-V3 shape, 10 layers, 16 experts (~20 GB), EP=2
    python bench/run.py convert --gpt-oss --ep 8   # GPT-OSS-120b shape, 2 layers, MXFP4 experts: import at EP=8
    python bench/run.py convert --layers 16 --workers 1 2 --repeats 3   # torch_dist import in 1 and 2 processes

Dense: a random bf16 Llama-shaped HF folder; the baseline reads the same safetensors bytes with
`safetensors.torch.load_file` and writes them with one `torch.save` (what a hand-written converter does). Ratio =
baseline time / bridge time (>= 1: bridge is faster). --moe keeps DeepSeek-V3's layer structure and full widths
(hidden 7168, MLA, 3 dense layers, routed experts of width 2048, a shared expert, the sigmoid router's bias, the
129k vocabulary) and scales only the number of layers and experts, so the largest tensor (the 1.7 GiB embedding)
is the real one; it is imported at EP and exported back. --gpt-oss writes GPT-OSS-120b's tensors at their real
sizes (128 experts of 2880, hidden 2880, the 201k vocabulary), experts in MXFP4 as the Hub stores them (random
bytes), on 2 of its 36 layers, and imports them at EP. The memory budget of a conversion is 2 x the largest
tensor + 1 GiB. Each step runs in a fresh interpreter that reports its own peak RSS (VmHWM), with the page cache
dropped before it where the OS lets us (root), so every step reads from and writes to the disk.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
#: Llama-3.2-1B's shape (tests/configs/meta-llama--Llama-3.2-1B); --layers scales the model.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                vocab_size=128256, tie_word_embeddings=True)
LLAMA_TINY = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, vocab_size=512)
DEEPSEEK_V3 = ROOT / "tests" / "configs" / "deepseek-ai--DeepSeek-V3" / "config.json"
GPT_OSS_20B = ROOT / "tests" / "configs" / "openai--gpt-oss-20b" / "config.json"
#: GPT-OSS-120b's differences from gpt-oss-20b's config.json (its layers, and every tensor the same size).
GPT_OSS_120B = dict(num_hidden_layers=36, num_local_experts=128)
GPT_OSS_TINY = dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    vocab_size=512, num_local_experts=8, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1)
DEEPSEEK_TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
                     num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                     v_head_dim=16, vocab_size=512, n_group=1, topk_group=1, num_experts_per_tok=2)

#: A step in a fresh interpreter. Peak RSS is VmHWM from /proc: ru_maxrss would carry the parent's high-water mark
#: into the child across fork + exec and charge the benchmark's own memory to the step.
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
{body}
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_rss": hwm * 1024, "child_peak_rss": children}}))
"""
BRIDGE = "from bridge.cli.main import main\nassert main(sys.argv[1:]) == 0"
BASELINE = "from bench.convert import baseline\nbaseline(*sys.argv[1:])"


def baseline(src: str, out: str) -> None:
    """What a hand-written converter does: every tensor read with load_file, one torch.save."""
    import torch
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(Path(src).glob("*.safetensors")):
        state.update(load_file(shard))
    torch.save(state, Path(out) / "baseline.pt")


def step(body: str, *argv: str, in_process: bool = False) -> dict[str, float | None]:
    """Run one step (BRIDGE or BASELINE with argv) in a fresh interpreter from a cold page cache; -> seconds, RSS."""
    if in_process:  # smoke: no memory figure
        from bridge.cli.main import main

        start = time.perf_counter()
        assert (baseline(*argv) if body == BASELINE else main(list(argv))) in (None, 0)
        return {"seconds": time.perf_counter() - start, "peak_rss": None}
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root: warm-cache numbers, noisier
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), body=body), *argv],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_hf(folder: Path, config: dict[str, Any], tile: bool = False) -> tuple[int, int]:
    """A random bf16 HF folder of `config`, written tensor by tensor (never whole in memory): (total, largest) bytes.
    Names as Hub checkpoints store them (one tensor per expert); `tile` repeats one random block (faster to make:
    content changes neither memory nor I/O)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bridge.converters.hf import PlannedTensor, StreamingSafetensorsWriter

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    hf_config = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    tied = config.get("tie_word_embeddings")
    state = {n: t for n, t in model.state_dict().items() if not (n == "lm_head.weight" and tied)}
    plan = [PlannedTensor(n, torch.float32 if n.endswith("e_score_correction_bias") else torch.bfloat16, shape)
            for n, shape in _checkpoint_shapes(state)]
    writer = StreamingSafetensorsWriter(folder, plan, max_shard_size=(5 if tile else 2) * 10**9)
    gen = torch.Generator().manual_seed(0)
    block = torch.randn(1 << 20, generator=gen) * 0.02
    for p in plan:
        n = torch.Size(p.shape).numel()
        data = block.repeat(-(-n // block.numel()))[:n].view(p.shape) if tile else torch.randn(p.shape, generator=gen) * 0.02
        writer.write(p.name, data.to(p.dtype))
    writer.close()
    return sum(p.nbytes for p in plan), max(p.nbytes for p in plan)


def _checkpoint_shapes(state: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """transformers fuses experts in memory (`experts.gate_up_proj` [E, 2F, h], `experts.down_proj` [E, h, F]); on
    disk every expert has its own gate/up/down_proj."""
    out = []
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            e, f2, h = t.shape
            base = name[:-len("gate_up_proj")]
            out += [(f"{base}{j}.{w}.weight", (f2 // 2, h)) for j in range(e) for w in ("gate_proj", "up_proj")]
        elif name.endswith("mlp.experts.down_proj"):
            e, h, f = t.shape
            out += [(f"{name[:-len('down_proj')]}{j}.down_proj.weight", (h, f)) for j in range(e)]
        else:
            out.append((name, tuple(t.shape)))
    return out


def write_mxfp4_hf(folder: Path, config: dict[str, Any]) -> tuple[int, int]:
    """A GPT-OSS HF folder of `config` whose experts' weights are MXFP4 `_blocks` and `_scales` (random bytes, scales
    around 2^0), the rest random bf16, written tensor by tensor: (total, largest) bytes as stored."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bridge.converters import mxfp4
    from bridge.converters.hf import PlannedTensor, StreamingSafetensorsWriter

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    hf_config = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items()
                                                              if k not in ("model_type", "quantization_config")})
    with torch.device("meta"):
        state = AutoModelForCausalLM.from_config(hf_config).state_dict()
    plan = []
    for name, t in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4.stored_shapes(tuple(t.shape))
            plan += [PlannedTensor(name + mxfp4.BLOCKS, torch.uint8, blocks),
                     PlannedTensor(name + mxfp4.SCALES, torch.uint8, scales)]
        else:
            plan.append(PlannedTensor(name, torch.bfloat16, tuple(t.shape)))
    writer = StreamingSafetensorsWriter(folder, plan, max_shard_size=5 * 10**9)
    gen = torch.Generator().manual_seed(0)
    for p in plan:
        if p.name.endswith(mxfp4.SCALES):
            data = torch.randint(120, 128, p.shape, generator=gen, dtype=torch.uint8)
        elif p.dtype == torch.uint8:
            data = torch.randint(0, 256, p.shape, generator=gen, dtype=torch.uint8)
        else:
            data = (torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype)
        writer.write(p.name, data)
        del data
    writer.close()
    return sum(p.nbytes for p in plan), max(p.nbytes for p in plan)


def gpt_oss_row(root: Path, layers: int, ep: int, smoke: bool) -> dict[str, Any]:
    """GPT-OSS-120b's tensors on `layers` of its layers, MXFP4 experts, imported at EP (dequantised to bf16)."""
    config = json.loads(GPT_OSS_20B.read_text())
    config.update(GPT_OSS_120B, num_hidden_layers=layers, layer_types=config["layer_types"][:layers])
    config.update(GPT_OSS_TINY if smoke else {})
    src, ckpt = root / "hf-gpt-oss", root / "ckpt-gpt-oss"
    total, largest = write_mxfp4_hf(src, config)
    imp = step(BRIDGE, "import", str(src), "--out", str(ckpt), "--ep", str(ep), in_process=smoke)
    written = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    for path in (src, ckpt):
        shutil.rmtree(path)
    return {"model": f"gpt-oss-120b shape, {layers} layers, MXFP4 experts, EP={ep}", "model_gib": total / GIB,
            "largest_gib": largest / GIB, "import_s": imp["seconds"], "import_rss": _gib(imp["peak_rss"]),
            "written_gib": written / GIB}


def dense_row(root: Path, layers: int, tp: int, smoke: bool) -> dict[str, Any]:
    src, ckpt, hf, base = (root / f"{n}-{layers}" for n in ("hf", "ckpt", "out", "baseline"))
    config = dict(LLAMA_TINY if smoke else LLAMA_1B, architectures=["LlamaForCausalLM"], model_type="llama",
                  num_hidden_layers=layers, torch_dtype="bfloat16")
    total, largest = write_hf(src, config)
    base.mkdir()
    b = step(BASELINE, str(src), str(base), in_process=smoke)
    imp = step(BRIDGE, "import", str(src), "--out", str(ckpt), "--tp", str(tp), in_process=smoke)
    exp = step(BRIDGE, "export", str(ckpt), "--out", str(hf), in_process=smoke)
    for path in (src, ckpt, hf, base):
        shutil.rmtree(path)
    return {"model": f"llama {layers} layers", "model_gib": total / GIB, "largest_gib": largest / GIB,
            "budget_gib": (2 * largest + GIB) / GIB, "baseline_s": b["seconds"], "baseline_rss": _gib(b["peak_rss"]),
            "import_s": imp["seconds"], "import_vs_base": b["seconds"] / imp["seconds"], "import_rss": _gib(imp["peak_rss"]),
            "export_s": exp["seconds"], "export_vs_base": b["seconds"] / exp["seconds"], "export_rss": _gib(exp["peak_rss"])}


def workers_rows(root: Path, layers: int, counts: list[int], repeats: int, smoke: bool) -> list[dict[str, Any]]:
    """`bridge import --format torch_dist --workers N` for each N, against the baseline, `repeats` rounds interleaved
    (baseline, N1, N2, ... per round, so that drift in the machine's load falls on every count alike); medians.
    A worker's peak RSS is ru_maxrss of the step's largest child: an upper bound, since a spawned process starts with
    its parent's high-water mark."""
    import statistics

    src = root / f"hf-{layers}"
    config = dict(LLAMA_TINY if smoke else LLAMA_1B, architectures=["LlamaForCausalLM"], model_type="llama",
                  num_hidden_layers=layers, torch_dtype="bfloat16")
    total, largest = write_hf(src, config)
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], **{f"w{n}": [] for n in counts}}
    for _ in range(repeats):
        base = root / "baseline"
        base.mkdir()
        runs["baseline"].append(step(BASELINE, str(src), str(base), in_process=smoke))
        shutil.rmtree(base)
        for n in counts:
            ckpt = root / f"ckpt-w{n}"
            runs[f"w{n}"].append(step(BRIDGE, "import", str(src), "--out", str(ckpt), "--format", "torch_dist",
                                      "--workers", str(n), in_process=smoke))
            shutil.rmtree(ckpt)
    shutil.rmtree(src)
    floor = statistics.median(r["seconds"] for r in runs["baseline"])
    rows = []
    for name, found in runs.items():
        seconds = statistics.median(r["seconds"] for r in found)
        rows.append({"model": f"llama {layers} layers, {total / GIB:.2f} GiB", "step": name if name == "baseline"
                     else f"import torch_dist --workers {name[1:]}", "seconds": seconds, "all_s": [r["seconds"] for r in found],
                     "vs_baseline": floor / seconds, "rss": _gib(max(r["peak_rss"] or 0 for r in found)),
                     "worker_rss": _gib(max(r.get("child_peak_rss") or 0 for r in found)), "largest_gib": largest / GIB})
    return rows


def moe_row(root: Path, layers: int, experts: int, dense: int, ep: int, smoke: bool) -> dict[str, Any]:
    """DeepSeek-V3's config.json with fewer layers and experts, bf16 (no FP8 scales), no MTP layer."""
    config = json.loads(DEEPSEEK_V3.read_text())
    config.update(num_hidden_layers=layers, n_routed_experts=experts, first_k_dense_replace=dense, n_group=8,
                  topk_group=4, num_experts_per_tok=8, num_nextn_predict_layers=0, torch_dtype="bfloat16")
    config.update(DEEPSEEK_TINY if smoke else {})
    config.pop("quantization_config", None)
    config.pop("auto_map", None)
    src, ckpt, out = root / "hf-moe", root / "ckpt-moe", root / "out-moe"
    total, largest = write_hf(src, config, tile=True)
    imp = step(BRIDGE, "import", str(src), "--out", str(ckpt), "--ep", str(ep), in_process=smoke)
    shutil.rmtree(src)  # two copies on disk at most
    exp = step(BRIDGE, "export", str(ckpt), "--out", str(out), in_process=smoke)
    for path in (ckpt, out):
        shutil.rmtree(path)
    return {"model": f"deepseek-v3 {layers} layers, {experts} experts, EP={ep}", "model_gib": total / GIB,
            "largest_gib": largest / GIB, "budget_gib": (2 * largest + GIB) / GIB, "import_s": imp["seconds"],
            "import_rss": _gib(imp["peak_rss"]), "export_s": exp["seconds"], "export_rss": _gib(exp["peak_rss"])}


def _gib(n: float | None) -> float | None:
    return None if n is None else n / GIB


def configure(p: argparse.ArgumentParser, suite: str) -> None:
    p.add_argument("--layers", type=int, nargs="+",
                   help="dense model depths (default 16 32); --moe: one (default 10); --gpt-oss: one (default 2)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--moe", action="store_true", help="the DeepSeek-V3-shaped MoE instead of the dense Llama")
    p.add_argument("--gpt-oss", action="store_true", help="GPT-OSS-120b's tensors, MXFP4 experts: import only")
    p.add_argument("--experts", type=int, default=16, help="--moe: routed experts per MoE layer (DeepSeek-V3: 256)")
    p.add_argument("--dense", type=int, default=3, help="--moe: first dense layers (DeepSeek-V3: 3)")
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+",
                   help="dense: import to torch_dist with each of these process counts (e.g. 1 2) instead of the usual row")
    p.add_argument("--repeats", type=int, default=3, help="--workers: rounds, interleaved; medians are reported")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one); needs ~2x the model")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bridge-bench-", dir=args.workdir))
    try:
        if args.smoke:  # every model, tiny, every step in this process
            rows = [dense_row(root, 2, 2, smoke=True), moe_row(root, 3, 4, 1, 2, smoke=True),
                    gpt_oss_row(root, 2, 2, smoke=True)]
        elif args.workers:
            rows = [row for layers in args.layers or [16]
                    for row in workers_rows(root, layers, args.workers, args.repeats, smoke=False)]
        elif args.gpt_oss:
            rows = [gpt_oss_row(root, (args.layers or [2])[0], args.ep, smoke=False)]
        elif args.moe:
            rows = [moe_row(root, (args.layers or [10])[0], args.experts, args.dense, args.ep, smoke=False)]
        else:
            rows = [dense_row(root, layers, args.tp, smoke=False) for layers in args.layers or [16, 32]]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"cold_cache": os.access("/proc/sys/vm/drop_caches", os.W_OK), "rows": rows}
