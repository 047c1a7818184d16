"""`bridge train --compile` against eager, layout by layout: does the compiled model train the same?

    python bench/compiled_parallel.py --layouts tp2,tp2-sp,cp2-a2a,ep2      # GPUs (NCCL) where present, else gloo

Each layout trains a small model from one seed, eager and then compiled, in fp32 on mock data; printed per layout:
the relative difference of the first step's gradient norm and the largest relative loss difference. A collective
whose gradient compiles wrong shows at once in the gradient norm (the eleventh session found torch 2.11 compiling
the in-place c10d calls of bridge's TP, sequence-parallel and a2a collectives to zero gradients: the attention
and MLP backward vanished from the compiled graphs). PYTHONPATH=<another checkout> runs that checkout's bridge.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

#: the model of each layout's run: a small dense Llama, or a Mixtral-shaped MoE for expert parallelism
DENSE = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=512,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=1024,
             tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=1024, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2)
MOE = dict(DENSE, architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
           num_experts_per_tok=2, router_aux_loss_coef=0.02, sliding_window=None)
LAYOUTS = {"tp2": (DENSE, dict(tp=2)), "tp2-sp": (DENSE, dict(tp=2, sequence_parallel=True)),
           "cp2-p2p": (DENSE, dict(cp=2)), "cp2-all_gather": (DENSE, dict(cp=2, cp_comm_type="all_gather")),
           "cp2-a2a": (DENSE, dict(cp=2, cp_comm_type="a2a")), "ep2": (MOE, dict(ep=2)),
           "ep2-tp2-sp": (MOE, dict(ep=2, tp=2, sequence_parallel=True))}


def run(config_dir: Path, layout: dict, *, compile: bool, steps: int, seq_length: int) -> dict:
    """One fp32 training run -> its losses and gradient norms."""
    from bridge.training import TrainConfig, train

    nproc = layout.get("tp", 1) * layout.get("cp", 1) * layout.get("ep", 1)  # data parallel = ep
    cfg = TrainConfig(model_config=str(config_dir), mock_data=True, nproc=nproc, micro_batch_size=2,
                      global_batch_size=2 * nproc // (layout.get("tp", 1) * layout.get("cp", 1)),
                      seq_length=seq_length, train_iters=steps, lr=1e-3, lr_warmup_iters=1, seed=1234,
                      compile=compile, eval_interval=0, progress=False, **layout)
    records = train(cfg)["records"]
    return {"losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records]}


def compare(eager: dict, compiled: dict) -> dict:
    rel = lambda a, b: abs(a - b) / abs(b)  # noqa: E731
    return {"grad_norm_step1": rel(compiled["grad_norms"][0], eager["grad_norms"][0]),
            "loss_max": max(rel(a, b) for a, b in zip(compiled["losses"], eager["losses"]))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="tp2,tp2-sp,cp2-a2a,ep2", help=f"of {', '.join(LAYOUTS)}")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--eager-json", type=Path, help="reuse the eager runs of an earlier --json (same settings)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from transformers import AutoConfig

    import bridge

    print(f"bridge from {Path(bridge.__file__).parent}", flush=True)
    eager_before = json.loads(args.eager_json.read_text()) if args.eager_json else {}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.layouts.split(","):
            shape, layout = LAYOUTS[name]
            config_dir = Path(tmp) / name
            AutoConfig.for_model(**shape).save_pretrained(config_dir)
            eager = eager_before.get(name, {}).get("eager") or run(config_dir, layout, compile=False,
                                                                    steps=args.steps, seq_length=args.seq_length)
            compiled = run(config_dir, layout, compile=True, steps=args.steps, seq_length=args.seq_length)
            results[name] = {"eager": eager, "compiled": compiled, **compare(eager, compiled)}
            print(f"{name}: step-1 gradient norm {compiled['grad_norms'][0]:.5g} compiled vs {eager['grad_norms'][0]:.5g}"
                  f" eager (relative difference {results[name]['grad_norm_step1']:.2e}); largest relative loss "
                  f"difference {results[name]['loss_max']:.2e}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
