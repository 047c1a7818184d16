"""MoE training throughput (suite moe): a Mixtral-shaped model (8 experts, top-2), fewer layers, on four GPUs.

    python bench/run.py moe                                             # four H100s: EP=4, 4 layers, seq 4096, mbs 2
    python bench/run.py moe --layouts ep4,ep4-distopt,ep2-tp2 --layers 8

Trains from random weights on random tokens (--mock-data) in bf16 with fp32 master weights. Per layout, the median
over the steps after --warmup of tokens/s (whole job), TFLOP/s per GPU and MFU (bridge.training.metrics: active
parameters, i.e. the router and the top-k experts of each MoE layer), the MoE aux loss and the peak GPU memory.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from bench.train import train_once

#: Mixtral-8x7B's widths (tests/configs/mistralai--Mixtral-8x7B-v0.1); --layers sets the depth (the real one: 32).
MIXTRAL = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096, intermediate_size=14336,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000, num_local_experts=8,
               num_experts_per_tok=2, router_aux_loss_coef=0.02, rope_theta=1000000.0, max_position_embeddings=32768,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, sliding_window=None)
TINY = dict(MIXTRAL, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=512, max_position_embeddings=256)
#: layout name -> TrainConfig fields
LAYOUTS = {"ep1": dict(ep=1), "ep2": dict(ep=2), "ep4": dict(ep=4), "ep2-tp2": dict(ep=2, tp=2),
           "ep4-distopt": dict(ep=4, use_distributed_optimizer=True)}


def configure(p: argparse.ArgumentParser, suite: str) -> None:
    p.add_argument("--layouts", default="ep4,ep4-distopt", help=f"comma-separated, of {', '.join(LAYOUTS)}")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bucket-size", type=int, default=40_000_000)


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape, device = MIXTRAL, "cuda"
    if args.smoke:
        shape, device, args.nproc, args.layouts = TINY, "cpu", None, "ep1"
        args.layers, args.seq_length, args.micro_batch_size, args.global_batch_size = 2, 64, 1, 4
        args.steps, args.warmup = 2, 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config"
        config.mkdir()
        (config / "config.json").write_text(json.dumps({**shape, "num_hidden_layers": args.layers}))
        for name in args.layouts.split(","):
            r = train_once(args.warmup, model_config=str(config), nproc=args.nproc, seq_length=args.seq_length,
                           micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                           train_iters=args.warmup + args.steps, lr=1e-4, lr_warmup_iters=0, bf16=not args.smoke,
                           accumulate_allreduce_grads_in_fp32=True, device=device, ddp_bucket_size=args.bucket_size,
                           **LAYOUTS[name.strip()])
            rows.append({"layout": name, "tokens_per_s": r["tokens_per_s"], "tflops_per_gpu": r["tflops_per_gpu"],
                         "mfu_%": None if r["mfu"] is None else 100 * r["mfu"], "aux_loss": r["moe_aux_loss"],
                         "final_loss": r["losses"][-1], "peak_gib": r["peak_mem_gib"]})
    return {"layers": args.layers, "seq_length": args.seq_length, "rows": rows}
