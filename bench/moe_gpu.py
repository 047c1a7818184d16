"""MoE training throughput of `bridge train` on GPUs: a Mixtral-shaped model (8 experts, top-2), fewer layers, EP=4.

    python bench/moe_gpu.py                                   # 4 GPUs: EP=4 (dp=4), 4 layers, seq 4096, bf16
    python bench/moe_gpu.py --layouts ep4,ep2-tp2,ep4-distopt --layers 8 --steps 20 --json out.json
    python bench/moe_gpu.py --smoke                           # CPU, tiny shapes: checks the script itself

Trains from random weights on random tokens (--mock-data) in bf16 with fp32 master weights. Reports, per
layout, the median over the steps after --warmup of tokens/s (whole job) and TFLOP/s per GPU and MFU from
bridge.training.metrics (active parameters: router + top-k experts per MoE layer), plus the MoE aux loss and
the peak GPU memory. Not run in this repository's sessions yet; its numbers go into docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

#: Mixtral-8x7B's widths (mistralai/Mixtral-8x7B-v0.1 config.json); --layers scales the depth (real: 32).
MIXTRAL = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096, intermediate_size=14336,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000, num_local_experts=8,
               num_experts_per_tok=2, router_aux_loss_coef=0.02, rope_theta=1000000.0, max_position_embeddings=32768,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, sliding_window=None)
SMOKE = dict(MIXTRAL, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=512, max_position_embeddings=256)

#: name -> TrainConfig overrides (nproc filled from --gpus).
LAYOUTS = {
    "ep4": dict(ep=4),
    "ep4-distopt": dict(ep=4, use_distributed_optimizer=True),
    "ep2-tp2": dict(ep=2, tp=2),
    "ep2": dict(ep=2),
}


def write_config(folder: Path, layers: int, smoke: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**(SMOKE if smoke else MIXTRAL), "num_hidden_layers": layers}))
    return folder


def run_layout(name: str, config_dir: Path, args: argparse.Namespace) -> dict[str, object]:
    """One `bridge train` job; medians over the steps after the warmup."""
    from bridge.training import TrainConfig, train

    gpus = 2 if args.smoke else args.gpus
    kw = dict(LAYOUTS[name])
    if args.smoke:
        kw = {k: min(v, 2) if k in ("ep", "tp") else v for k, v in kw.items()}
    cfg = TrainConfig(model_config=str(config_dir), mock_data=True, nproc=gpus, seq_length=args.seq_length,
                      micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                      train_iters=args.warmup + args.steps, lr=1e-4, lr_warmup_iters=0, eval_interval=0,
                      bf16=not args.smoke, accumulate_allreduce_grads_in_fp32=True, progress=False,
                      device="cpu" if args.smoke else "cuda", ddp_bucket_size=args.bucket_size, **kw)
    summary = train(cfg)
    steps = summary["records"][args.warmup:]
    mfu = [r["mfu"] for r in steps if r["mfu"] is not None]
    return {"layout": name, "gpus": gpus, **kw, "seq_length": args.seq_length, "global_batch_size": args.global_batch_size,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
            "tflops_per_gpu": statistics.median(r["tflops_per_gpu"] for r in steps),
            "mfu": statistics.median(mfu) if mfu else None,
            "moe_aux_loss": steps[-1].get("moe_aux_loss"), "final_loss": steps[-1]["loss"],
            "peak_mem_gib": max(r["peak_mem_gib"] for r in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="ep4", help=f"comma-separated, from {', '.join(LAYOUTS)}")
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bucket-size", type=int, default=40_000_000)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 2 ranks")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.seq_length, args.global_batch_size, args.steps, args.warmup = 2, 64, 4, 2, 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="bridge-moe-bench-") as tmp:
        config_dir = write_config(Path(tmp) / "config", args.layers, args.smoke)
        for name in args.layouts.split(","):
            rows.append(run_layout(name.strip(), config_dir, args))
    print(f"{'layout':<12} {'tokens/s':>10} {'TFLOP/s/GPU':>12} {'MFU':>6} {'aux loss':>9} {'peak GiB':>9}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['layout']:<12} {r['tokens_per_s']:>10.0f} {r['tflops_per_gpu']:>12.1f} {mfu:>6} "
              f"{r['moe_aux_loss'] or 0:>9.4f} {r['peak_mem_gib']:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
