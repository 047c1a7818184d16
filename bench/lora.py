"""LoRA training throughput on one GPU: bridge's LoRA against HF transformers + peft + torch.compile (suite lora-1gpu).

    python bench/run.py lora-1gpu                      # Llama-3.1-8B shape, all 32 layers, r=16 on all linears, seq 4096
    python bench/run.py lora-1gpu --layers 8 --seq-length 2048
    python bench/run.py lora-1gpu --smoke              # CPU, tiny shapes: checks the code, measures nothing

Both sides train the same architecture from random weights on random tokens, with a frozen bf16 base and a rank-r
adapter on q/k/v/o/gate/up/down (bridge: linear_qkv, linear_proj, linear_fc1, linear_fc2), AdamW on the adapter and
gradient clipping at 1.0, in the same invocation. bridge: `bridge train --model-config ... --lora-rank r --bf16
--compile` (fp32 masters and moments for the adapter). Baseline: LlamaForCausalLM loaded in bf16, peft's LoRA (its
adapter weights in fp32, peft's default next to a bf16 base) under bf16 autocast, the whole model torch.compile'd,
fused AdamW. Each side runs in its own process, so GPU memory is not shared; tokens/s is the median over the steps
after --warmup and peak memory is torch's max_memory_allocated of that process.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.train import MODELS, run_baseline, timed_hf_steps, train_once, write_config

PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def configure(p: argparse.ArgumentParser, suite: str) -> None:
    p.add_argument("--model", choices=sorted(MODELS), default="llama-8b-8l", help="shape; --layers sets the depth")
    p.add_argument("--layers", type=int, default=32, help="layers of the shape (Llama-3.1-8B: 32)")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4, help="untimed first steps (compilation)")
    p.add_argument("--recompute", choices=["full", "selective", "elementwise"])
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager mode on both sides")


def peft_baseline(config_dir: str, opts: dict[str, Any]) -> dict[str, Any]:
    """HF + peft LoRA, bf16 base, bf16 autocast, torch.compile, fused AdamW on the adapter -> step times, memory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, LlamaForCausalLM

    device = torch.device(opts["device"])
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_dir)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=opts["rank"], lora_alpha=opts["alpha"], target_modules=PEFT_TARGETS))
    if opts["recompute"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return timed_hf_steps(model, [p for p in model.parameters() if p.requires_grad], opts)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = None
    if args.smoke:
        args.model, args.layers, args.seq_length, args.micro_batch_size, args.global_batch_size = "tiny", 2, 32, 2, 4
        args.steps, args.warmup, args.compile, args.rank, device = 2, 1, False, 4, "cpu"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = write_config(args.model, Path(tmp) / "config", args.layers)
        r = train_once(args.warmup, catch=not args.smoke, model_config=str(config_dir), nproc=None if args.smoke else 1,
                       micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                       seq_length=args.seq_length, train_iters=args.warmup + args.steps, lr=1e-4, bf16=True,
                       compile=args.compile, recompute=args.recompute, device=device, lora_rank=args.rank,
                       lora_alpha=args.alpha)
        rows.append({"run": f"bridge LoRA r={args.rank}", **({"error": r["error"]} if "error" in r else {
            "tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_mem_gib"], "losses": r["losses"]})})
        opts = {**{k: getattr(args, k) for k in ("micro_batch_size", "global_batch_size", "seq_length", "steps",
                                                  "warmup", "compile", "rank", "alpha", "recompute")},
                "device": device or "cuda"}
        h = run_baseline(peft_baseline, config_dir, opts)
        if "error" in h:
            rows.append({"run": "HF + peft + compile", "error": h["error"]})
        else:
            tps = args.global_batch_size * args.seq_length / statistics.median(h["step_s"])
            rows.append({"run": "HF + peft + compile", "tokens_per_s": tps, "peak_gib": h["peak_mem_gib"]})
            if "tokens_per_s" in rows[0]:
                rows[0]["vs_peft"] = rows[0]["tokens_per_s"] / tps
    return {"model": args.model, "layers": args.layers, "seq_length": args.seq_length, "rows": rows}
