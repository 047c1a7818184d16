"""Training throughput of `bridge train` against HF transformers + torch.compile + fused AdamW, in one run.

One GPU (the issue's goal: >= 1.25x):
    python bench/train.py --model llama-3.2-1b --seq-length 2048 --micro-batch-size 4 --steps 20
Four GPUs, 8B-shaped model with 8 layers, MFU per layout (goal: >= 45% at TP=4):
    python bench/train.py --model llama-8b-8l --seq-length 4096 --nproc 4 --layouts tp4,tp2pp2,dp4-distopt --no-baseline
CPU smoke test (CI):
    python bench/train.py --smoke

Both sides train the same architecture from random weights on random tokens (Megatron's --mock-data)
in bf16: bridge with bf16 parameters, fp32 gradients and fp32 master weights, HF with fp32 parameters under bf16
autocast (its standard recipe). Throughput is the median over the steps after --warmup; MFU uses the
formula of docs/training.md. Each side runs in its own process, so GPU memory is not shared.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-8b-8l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                        rope_theta=500000.0, max_position_embeddings=131072,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
                 rope_theta=10000.0, max_position_embeddings=256),
}


def write_config(name: str, folder: Path, layers: int | None = None) -> Path:
    """`name`'s config.json in `folder`; `layers` overrides its depth (how step time grows with depth)."""
    from transformers import LlamaConfig

    shape = dict(MODELS[name], **({"num_hidden_layers": layers} if layers else {}))
    LlamaConfig(architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                **shape).save_pretrained(folder)
    return folder


def hf_worker(config_dir: str, args: dict, queue: mp.Queue) -> None:
    """HF LlamaForCausalLM, fp32 params, bf16 autocast, torch.compile, fused AdamW: per-step seconds."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_dir)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_fn = torch.compile(model) if args["compile"] else model
    micro = args["global_batch_size"] // args["micro_batch_size"]
    times = []
    for _ in range(args["warmup"] + args["steps"]):
        start = time.perf_counter()
        for _ in range(micro):
            ids = torch.randint(0, config.vocab_size, (args["micro_batch_size"], args["seq_length"] + 1), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = step_fn(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss / micro
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    queue.put({"step_s": times[args["warmup"]:], "peak_mem_gib": peak})


def run_hf(config_dir: Path, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=hf_worker, args=(str(config_dir), vars(args), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run_bridge(config_dir: Path, args: argparse.Namespace, layout: str) -> dict:
    from bridge.training import TrainConfig, train

    tp, pp, vpp, distopt, sp = parse_layout(layout)
    nproc = args.nproc
    cfg = TrainConfig(model_config=str(config_dir), mock_data=True, nproc=nproc, tp=tp, pp=pp, vpp=vpp,
                      use_distributed_optimizer=distopt, sequence_parallel=tp > 1 and (sp or args.sequence_parallel),
                      micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size * (nproc // (tp * pp)),
                      seq_length=args.seq_length, train_iters=args.warmup + args.steps, lr=1e-4, bf16=args.bf16,
                      compile=args.compile, recompute=args.recompute, eval_interval=0, progress=False,
                      device=args.device, attention_backend=args.attention_backend,
                      gradient_accumulation_fusion=args.gradient_accumulation_fusion, rope_fusion=args.rope_fusion,
                      grad_reduce_in_bf16=args.grad_reduce_in_bf16,
                      fp8=args.fp8, fp8_format=args.fp8_format, fp8_output_proj=args.fp8_output_proj,
                      first_last_layers_bf16=args.first_last_layers_bf16,
                      profile=args.profile is not None, profile_step_start=args.warmup + 1,
                      profile_step_end=args.warmup + 3, tensorboard_dir=args.profile)
    summary = train(cfg)
    records = summary["records"][args.warmup:]
    return {"step_s": [r["step_s"] for r in records], "peak_mem_gib": max(r["peak_mem_gib"] for r in records),
            "mfu": statistics.median(r["mfu"] for r in records) if records[0]["mfu"] is not None else None,
            "global_batch_size": cfg.global_batch_size, "losses": [r["loss"] for r in summary["records"]]}


def parse_layout(text: str) -> tuple[int, int, int | None, bool, bool]:
    """'tp2pp2', 'tp4-sp', 'dp4-distopt', 'pp2vpp2' -> (tp, pp, vpp, distributed optimizer, sequence parallel)."""
    import re

    def num(key: str, default: int | None) -> int | None:
        m = re.search(key + r"(\d+)", text)
        return int(m.group(1)) if m else default

    return num("tp", 1), num("(?<!v)pp", 1), num("vpp", None), "distopt" in text, "sp" in text.split("-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="llama-3.2-1b")
    p.add_argument("--layers", type=int, help="override the model's number of layers")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8, help="per DP rank (scaled by DP for bridge)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps (compilation, allocator warm-up)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--layouts", default="tp1", help="comma-separated bridge layouts, e.g. tp4,tp2pp2,dp4-distopt")
    p.add_argument("--recompute", choices=["full", "selective"])
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "flash", "fused", "unfused"])
    p.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion", action="store_false")
    p.add_argument("--grad-reduce-in-bf16", action="store_true", help="bf16 gradients (the default is fp32)")
    p.add_argument("--no-rope-fusion", dest="rope_fusion", action="store_false")
    p.add_argument("--fp8", choices=["tensorwise", "rowwise"], help="bridge trains with FP8 linear layers (torchao)")
    p.add_argument("--fp8-output-proj", action="store_true", help="the output layer in FP8 too")
    p.add_argument("--first-last-layers-bf16", action="store_true", help="with --fp8, the first and last layer in bf16")
    p.add_argument("--fp8-format", choices=["hybrid", "e4m3"], help="FP8 output gradients: e5m2 (hybrid) or e4m3")
    p.add_argument("--profile", metavar="DIR", help="profile two bridge steps after the warm-up into DIR")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager mode on both sides")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the HF run (multi-GPU layouts)")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, 2 steps: checks the script runs")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    args.bf16, args.device = True, None
    if args.smoke:
        args.model, args.seq_length, args.micro_batch_size, args.global_batch_size = "tiny", 32, 2, 4
        args.steps, args.warmup, args.compile, args.device = 2, 1, False, "cpu"
    tokens = args.global_batch_size * args.seq_length
    results = {"model": args.model, "seq_length": args.seq_length, "device": _device_name(), "layouts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = write_config(args.model, Path(tmp) / "config", args.layers)
        for layout in args.layouts.split(","):
            r = run_bridge(config_dir, args, layout)
            tps = r["global_batch_size"] * args.seq_length / statistics.median(r["step_s"])
            results["layouts"][layout] = {"tokens_per_s": tps, "tokens_per_s_per_gpu": tps / args.nproc,
                                          "mfu": r["mfu"], "peak_mem_gib": r["peak_mem_gib"], "losses": r["losses"]}
            print(f"bridge {layout:>12}: {tps:12.0f} tokens/s ({tps / args.nproc:.0f}/GPU)  MFU "
                  f"{_pct(r['mfu'])}  peak {r['peak_mem_gib']:.1f} GiB", flush=True)
        if args.baseline:
            h = run_hf(config_dir, args)
            tps = tokens / statistics.median(h["step_s"])
            results["hf_compile"] = {"tokens_per_s": tps, "peak_mem_gib": h["peak_mem_gib"]}
            first = next(iter(results["layouts"].values()))
            results["ratio"] = first["tokens_per_s_per_gpu"] / tps
            print(f"HF + compile + fused AdamW: {tps:12.0f} tokens/s; bridge/HF = {results['ratio']:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return 0


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
