"""Context parallelism with MoE and MLA on GPUs (NCCL): `bridge verify --cp 2` of EP=2 checkpoints against
transformers, and `bridge train --cp 2 --ep 2` against `--cp 1 --ep 2` (DP=2) on the same global batches.

    python bench/gpu_cp_moe.py --json out.json     # 2 GPUs: a DeepSeek-V3-shaped model (MLA's real head sizes:
                                                   # q/k 192, v 128) and a Mixtral-shaped one, both few layers
    python bench/gpu_cp_moe.py --sp --json o.json  # 4 GPUs: TP=2 x EP=2 with sequence parallelism instead of CP
    python bench/gpu_cp_moe.py --smoke             # CPU, tiny shapes: checks the script itself

The models are built locally with random weights (the embedding scaled to unit variance, as bench/gpu_verify.py
explains, so bf16 top-1 agreement means something). Under CP, MLA's narrower v travels the ring as it is and its
softmax scale goes to the ring's kernels (bridge.parallel.ring): on GPUs this is the path that runs cuDNN or flash
blocks at head size 192. `--verify-only` compares bf16 verify with and without CP=2 (with --sp: with and without
sequence parallelism); `--device cpu` runs the same shapes on the CPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_verify import build_model  # noqa: E402
from moe_gpu import MIXTRAL  # noqa: E402

#: DeepSeek-V3's attention (deepseek-ai/DeepSeek-V3 config.json: MLA ranks and head sizes, YaRN) and router
#: (sigmoid, bias, shared expert), narrower and shallower: 3 layers, the first dense, 8 experts of 512.
DEEPSEEK = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=1024,
                intermediate_size=2048, moe_intermediate_size=512, num_hidden_layers=3, first_k_dense_replace=1,
                n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                norm_topk_prob=True, routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
                num_attention_heads=16, num_key_value_heads=16, q_lora_rank=1536, kv_lora_rank=512,
                qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000,
                rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                              "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                max_position_embeddings=163840, vocab_size=32000, rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=0, attention_bias=False)
MIXTRAL_SMALL = dict(MIXTRAL, hidden_size=1024, intermediate_size=2048, num_attention_heads=16, num_key_value_heads=4,
                     head_dim=64, num_hidden_layers=2)
SMOKE = {"deepseek-v3": dict(DEEPSEEK, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                             num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=512),
         "mixtral": dict(MIXTRAL_SMALL, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=256)}


#: name -> (import layout, verify keywords, the two training layouts compared); world: 2 GPUs, or 4 with --sp
MODES = {"cp": (dict(ep=2), dict(cp=2), {"cp1": dict(nproc=2, ep=2), "cp2": dict(nproc=2, ep=2, cp=2)}),
         "sp": (dict(ep=2, tp=2, moe_grouped_gemm=True), dict(sequence_parallel=True),
                {"tp2": dict(nproc=4, ep=2, tp=2), "tp2-sp": dict(nproc=4, ep=2, tp=2, sequence_parallel=True)})}


def train_run(ckpt: Path, *, layout: dict, args: argparse.Namespace) -> dict:
    from bridge.training import TrainConfig, train

    cfg = TrainConfig(load=str(ckpt), mock_data=True, bf16=args.dtype == "bf16", micro_batch_size=1,
                      global_batch_size=2, seq_length=args.seq_length, train_iters=args.steps, lr=1e-4,
                      lr_warmup_iters=2, eval_interval=0, progress=False, save=None, device=args.device, **layout)
    summary = train(cfg)
    records = summary["records"][2:]
    mem = [r["peak_mem_gib"] for r in records if r.get("peak_mem_gib") is not None]
    return {"losses": [r["loss"] for r in summary["records"]],
            "tokens_per_s": 2 * args.seq_length / statistics.median(r["step_s"] for r in records),
            "peak_mem_gib": max(mem) if mem else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="deepseek-v3,mixtral")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="training precision")
    p.add_argument("--verify-only", action="store_true",
                   help="bf16 verify with and without CP=2 (or SP) only: is a bf16 miss theirs?")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--sp", action="store_true", help="TP=2 x EP=2 with sequence parallelism (4 GPUs) instead of CP=2")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    args.device = "cpu" if args.smoke else args.device
    if args.smoke:
        args.seq_length, args.steps, args.dtype = 64, 4, "fp32"
    from bridge.api import import_hf
    from bridge.layout import ParallelLayout
    from bridge.verify import verify

    layout, verify_kw, runs = MODES["sp" if args.sp else "cp"]
    shown = ", ".join(f"{k}={v}" for k, v in {**layout, **verify_kw}.items() if k != "moe_grouped_gemm")
    results, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            config = (SMOKE if args.smoke else {"deepseek-v3": DEEPSEEK, "mixtral": MIXTRAL_SMALL})[name]
            (work / f"{name}.json").write_text(json.dumps(config))
            hf = build_model(work / f"{name}-hf", work / f"{name}.json", {}, embed_std=1.0)
            ckpt = import_hf(hf, work / f"{name}-ckpt", ParallelLayout(**layout), dtype="bf16", overwrite=True)
            out = results[name] = {}
            if args.verify_only:
                for label, kw in (("without", {}), ("with", verify_kw)):
                    result = verify(hf, ckpt, dtype="bf16", device=args.device, write_json=False, **kw)
                    print(result.table(), flush=True)
                    out[f"verify_bf16_{label}"] = {"max_abs": result.overall.max_abs, "top1": result.overall.top1,
                                                   "cosine": result.overall.cosine, "passed": result.passed}
                continue
            for dtype in ("fp32", "bf16"):
                t0 = time.time()
                result = verify(hf, ckpt, dtype=dtype, device=args.device, write_json=False, **verify_kw)
                print(result.table(), f"\n({name} {dtype} verify at {shown}: {time.time() - t0:.0f}s)\n", flush=True)
                out[f"verify_{dtype}"] = {"passed": result.passed, "max_abs": result.overall.max_abs,
                                          "cosine": result.overall.cosine, "top1": result.overall.top1}
                ok &= result.passed
            for run, train_layout in runs.items():
                out[f"train_{run}"] = r = train_run(ckpt, layout=train_layout, args=args)
                print(f"{name} train {run} ep=2 ({args.dtype}, seq {args.seq_length}): {r['tokens_per_s']:.0f} tokens/s, "
                      f"peak {r['peak_mem_gib']} GiB, losses {[round(x, 4) for x in r['losses']]}", flush=True)
            a, b = (out[f"train_{run}"]["losses"] for run in runs)
            out["max_rel_loss_diff"] = max(abs(x - y) / abs(x) for x, y in zip(a, b))
            print(f"{name}: max relative loss difference {' vs '.join(reversed(runs))} over {len(a)} steps "
                  f"{out['max_rel_loss_diff']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
