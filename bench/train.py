"""Training throughput: suites train-1gpu and layouts-4gpu, and the training run the other suites share.

    python bench/run.py train-1gpu                   # one H100: 1B shape, seq 2048, mbs 4, global batch 8
    python bench/run.py layouts-4gpu                 # four H100s: 8B shape (8 layers), seq 4096, TP=4, TP=2 x PP=2, DP=4
    python bench/run.py train-1gpu --profile prof    # + where a step's GPU time goes (two profiled steps)

train-1gpu runs bridge and, in the same invocation, the baseline: HF transformers' LlamaForCausalLM with fp32
parameters under bf16 autocast (its standard recipe), torch.compile of the whole model, fused AdamW and gradient
clipping at 1.0. bridge trains bf16 parameters with fp32 gradients and fp32 master weights, its layers compiled.
Both train the same architecture from random weights on random tokens (Megatron's --mock-data). Each side runs in
its own process, so GPU memory is not shared. Tokens/s is the median over the steps after --warmup; MFU uses the
model-FLOPs formula of docs/training.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
#: Model shapes: Llama-3.2-1B's and Llama-3.1-8B's config.json (tests/configs), the 8B one at 8 of its 32 layers
#: unless --layers says otherwise (the whole 8B model with Adam does not fit one 80 GB card).
MODELS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-8b-8l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                        rope_theta=500000.0, max_position_embeddings=131072,
                        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}),
    # Gemma-2-2B's config.json: softcapped attention and logits, alternate 4096-token windows, head_dim 256
    "gemma-2-2b": dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_size=2304,
                       intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=256, vocab_size=256000, tie_word_embeddings=True, rope_theta=10000.0,
                       max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                       rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # GLM-4.5-Air's shape (Glm4MoeConfig's defaults with the released head_dim, qkv bias and RoPE base) at 4 of its 46
    # layers: one dense, three MoE of 128 experts (top-8, one shared); ~8.5B parameters, ~136 GB with fp32 masters and
    # Adam, so one 80 GB card needs --layers 2 (not run yet)
    "glm-4.5-air-4l": dict(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", hidden_size=4096,
                           intermediate_size=10944, num_hidden_layers=4, num_attention_heads=96, num_key_value_heads=8,
                           head_dim=128, vocab_size=151552, tie_word_embeddings=False, attention_bias=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5},
                           max_position_embeddings=131072, n_routed_experts=128, num_experts_per_tok=8,
                           moe_intermediate_size=1408, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                           topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True, use_qk_norm=False,
                           num_nextn_predict_layers=0),
    # GPT-OSS-20b's config.json (tests/configs; its experts in bf16, not MXFP4) at 4 of its 24 layers: sinks, windows of
    # 128 on alternate layers, YaRN, 32 experts of 2880 taking 4. 4.45B parameters: with bf16 weights, fp32 gradients,
    # fp32 master weights and Adam about 80 GB before activations, so an H200 (on an H100: --layers 2)
    "gpt-oss-20b-4l": dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", hidden_size=2880,
                           intermediate_size=2880, num_hidden_layers=4, num_attention_heads=64, num_key_value_heads=8,
                           head_dim=64, vocab_size=201088, tie_word_embeddings=False, num_local_experts=32,
                           num_experts_per_tok=4, sliding_window=128, layer_types=["sliding_attention", "full_attention"],
                           rope_theta=150000.0, max_position_embeddings=131072, attention_bias=True, swiglu_limit=7.0,
                           rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                         "original_max_position_embeddings": 4096, "truncate": False},
                           router_aux_loss_coef=0.9, eos_token_id=200002, pad_token_id=199999),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
                 rope_theta=10000.0, max_position_embeddings=256),
}
_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def write_config(name: str, folder: Path, layers: int | None = None, **overrides: Any) -> Path:
    """`name`'s config.json in `folder`; `layers` overrides its depth."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5, "bos_token_id": 1,
              "eos_token_id": 2, **MODELS[name], **({"num_hidden_layers": layers} if layers else {}), **overrides}
    if "layer_types" in config:  # a per-layer pattern, repeated over the layers
        config["layer_types"] = [config["layer_types"][i % len(config["layer_types"])]
                                 for i in range(config["num_hidden_layers"])]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@contextmanager
def _own_rank_env() -> Iterator[None]:
    """A one-rank run in this process sets torchrun's variables; take them away again, so the next run is fresh."""
    before = {k: os.environ.get(k) for k in _RANK_ENV}
    try:
        yield
    finally:
        for k, v in before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def train_once(warmup: int, *, catch: bool = False, **config: Any) -> dict[str, Any]:
    """One `bridge train` run (TrainConfig fields as keywords) -> medians over the steps after `warmup`. nproc=N
    spawns the ranks, so every run starts with empty GPUs; nproc=None trains in this process (smoke runs). With
    `catch`, a run that fails (out of memory) is returned as {"error": ...}."""
    from bridge.training import TrainConfig, train

    cfg = TrainConfig(mock_data=config.pop("mock_data", not config.get("data_path")), eval_interval=0, eval_iters=1,
                      progress=False, **config)  # the one evaluation at the end: one batch
    try:
        with _own_rank_env():
            summary = train(cfg)
    except Exception as exc:  # noqa: BLE001 - in a sweep, a point that does not fit is a result
        if not catch:
            raise
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[-1][:300] if str(exc) else ''}"}
    records = summary["records"][warmup:]

    def median(key: str) -> float | None:
        return statistics.median(r[key] for r in records) if records[0].get(key) is not None else None

    mem = [r["peak_mem_gib"] for r in records if r.get("peak_mem_gib") is not None]
    step_mem = [r["step_peak_mem_gib"] for r in records if r.get("step_peak_mem_gib") is not None]
    tokens_per_step = records[0]["tokens_per_s"] * records[0]["step_s"]
    return {"tokens_per_s": tokens_per_step / statistics.median(r["step_s"] for r in records), "mfu": median("mfu"),
            "real_tokens_per_s": median("real_tokens_per_s"), "packing_efficiency": median("packing_efficiency"),
            "tflops_per_gpu": median("tflops_per_gpu"), "peak_mem_gib": max(mem) if mem else None,
            "step_peak_mem_gib": max(step_mem) if step_mem else None,
            "moe_aux_loss": records[-1].get("moe_aux_loss"), "losses": [r["loss"] for r in summary["records"]],
            "lrs": [r["lr"] for r in summary["records"]]}


def parse_layout(text: str) -> dict[str, Any]:
    """'tp2pp2', 'tp4-sp', 'dp4-distopt', 'pp2vpp2' -> TrainConfig fields (tp, pp, vpp, ...)."""
    def num(key: str, default: int | None) -> int | None:
        m = re.search(key + r"(\d+)", text)
        return int(m.group(1)) if m else default

    tp = num("tp", 1)
    return {"tp": tp, "pp": num("(?<!v)pp", 1), "vpp": num("vpp", None), "use_distributed_optimizer": "distopt" in text,
            "sequence_parallel": tp > 1 and "sp" in text.split("-")}


def timed_hf_steps(model: Any, params: list[Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Train an HF model as HF Trainer does (bf16 autocast, `torch.compile` unless opts says not, fused AdamW on
    `params`, clipping at 1.0) on random tokens -> the step times after the warm-up, the run's peak memory and the
    peak of the steps after the warm-up (compilation done)."""
    import torch

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    step_fn = torch.compile(model) if opts["compile"] else model
    micro = opts["global_batch_size"] // opts["micro_batch_size"]
    times, run_peak = [], 0.0
    for i in range(opts["warmup"] + opts["steps"]):
        if i == opts["warmup"] and device.type == "cuda":  # from here on: what a step needs, compilation done
            run_peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(micro):
            ids = torch.randint(0, vocab, (opts["micro_batch_size"], opts["seq_length"] + 1), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = step_fn(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss / micro
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"step_s": times[opts["warmup"]:], "peak_mem_gib": None if step_peak is None else max(run_peak, step_peak),
            "step_peak_mem_gib": step_peak}


def hf_baseline(config_dir: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The HF model of the config, fp32 parameters, bf16 autocast, torch.compile, fused AdamW, clipping 1.0 -> step
    times. Attention is SDPA, except where SDPA would drop part of the model: Gemma 2's attention softcap runs in
    transformers' eager attention, as its documentation asks for training, and so do GPT-OSS's sinks (transformers
    has no SDPA path for them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(opts["device"])
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(config_dir)
    eager = getattr(config, "attn_logit_softcapping", None) is not None or config.model_type == "gpt_oss"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager" if eager else "sdpa").to(device)
    return timed_hf_steps(model, list(model.parameters()), opts)


def _baseline_worker(fn: Any, config_dir: str, opts: dict[str, Any], queue: mp.Queue) -> None:
    try:
        queue.put(fn(config_dir, opts))
    except Exception as exc:  # noqa: BLE001 - an out-of-memory baseline is a result
        queue.put({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"})


def run_baseline(fn: Any, config_dir: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """A baseline `fn(config_dir, opts)` in its own process on a GPU (memory not shared with bridge's run), in this
    one on the CPU; a run that fails (out of memory) comes back as {"error": ...}."""
    if opts["device"] == "cpu":
        return fn(str(config_dir), opts)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_baseline_worker, args=(fn, str(config_dir), opts, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def configure(p: argparse.ArgumentParser, suite: str) -> None:
    four = suite == "layouts-4gpu"
    p.add_argument("--model", choices=sorted(MODELS), default="llama-8b-8l" if four else "llama-3.2-1b")
    p.add_argument("--layers", type=int, help="override the model's number of layers")
    p.add_argument("--seq-length", type=int, default=4096 if four else 2048)
    p.add_argument("--micro-batch-size", type=int, default=2 if four else 4)
    p.add_argument("--global-batch-size", type=int, default=8, help="per DP rank (scaled by DP for bridge)")
    p.add_argument("--steps", type=int, default=8 if four else 15)
    p.add_argument("--warmup", type=int, default=4 if four else 5, help="untimed first steps (compilation)")
    p.add_argument("--nproc", type=int, default=4 if four else 1)
    p.add_argument("--layouts", default="tp4,tp2pp2,dp4-distopt" if four else "tp1",
                   help="comma-separated bridge layouts, e.g. tp4,tp2pp2,tp4-sp,dp4-distopt,pp2vpp2")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", default=not four,
                   help="skip the HF run")
    p.add_argument("--recompute", choices=["full", "selective", "elementwise"])
    p.add_argument("--attention-backend", default="auto", choices=["auto", "flash", "fused", "unfused"])
    p.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion", action="store_false")
    p.add_argument("--grad-reduce-in-bf16", action="store_true", help="bf16 gradients (the default is fp32)")
    p.add_argument("--use-precision-aware-optimizer", action="store_true",
                   help="fp32 masters kept as 16-bit remainders beside the bf16 weights")
    p.add_argument("--no-rope-fusion", dest="rope_fusion", action="store_false")
    p.add_argument("--no-linear-cross-entropy-fusion", dest="linear_cross_entropy_fusion", action="store_false",
                   help="all the logits at once, kept for backward (the memory the fused loss saves)")
    p.add_argument("--fp8", choices=["tensorwise", "rowwise"], help="bridge trains with FP8 linear layers (torchao)")
    p.add_argument("--fp8-output-proj", action="store_true", help="the output layer in FP8 too")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager mode on both sides")
    p.add_argument("--profile", metavar="DIR", help="profile two bridge steps after the warm-up into DIR, summarised")


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = None
    if args.smoke:
        args.model, args.seq_length, args.micro_batch_size, args.global_batch_size = "tiny", 32, 2, 4
        args.steps, args.warmup, args.compile, device = 2, 1, False, "cpu"
        args.nproc, args.layouts = 1, "dp1-distopt" if args.suite == "layouts-4gpu" else "tp1"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = write_config(args.model, Path(tmp) / "config", args.layers)
        for layout in args.layouts.split(","):
            lay = parse_layout(layout)
            r = train_once(args.warmup, model_config=str(config_dir), nproc=None if args.smoke else args.nproc,
                           micro_batch_size=args.micro_batch_size,
                           global_batch_size=args.global_batch_size * (args.nproc // (lay["tp"] * lay["pp"])),
                           seq_length=args.seq_length, train_iters=args.warmup + args.steps, lr=1e-4, bf16=True,
                           compile=args.compile, recompute=args.recompute, device=device,
                           attention_backend=args.attention_backend,
                           gradient_accumulation_fusion=args.gradient_accumulation_fusion, rope_fusion=args.rope_fusion,
                           linear_cross_entropy_fusion=args.linear_cross_entropy_fusion,
                           grad_reduce_in_bf16=args.grad_reduce_in_bf16, fp8=args.fp8,
                           use_precision_aware_optimizer=args.use_precision_aware_optimizer,
                           fp8_output_proj=args.fp8_output_proj, profile=args.profile is not None,
                           profile_step_start=args.warmup + 1, profile_step_end=args.warmup + 3,
                           tensorboard_dir=args.profile, **lay)
            rows.append({"run": f"bridge {layout}", "tokens_per_s": r["tokens_per_s"],
                         "per_gpu": r["tokens_per_s"] / args.nproc, "mfu_%": _pct(r["mfu"]),
                         "peak_gib": r["peak_mem_gib"], "step_peak_gib": r["step_peak_mem_gib"], "losses": r["losses"]})
        if args.baseline:
            opts = {**{k: getattr(args, k) for k in ("micro_batch_size", "global_batch_size", "seq_length", "steps",
                                                      "warmup", "compile")}, "device": device or "cuda"}
            h = run_baseline(hf_baseline, config_dir, opts)
            if "error" in h:
                rows.append({"run": "HF + compile + fused AdamW", "error": h["error"]})
                return {"model": args.model, "seq_length": args.seq_length, "rows": rows}
            tps = args.global_batch_size * args.seq_length / statistics.median(h["step_s"])
            rows.append({"run": "HF + compile + fused AdamW", "tokens_per_s": tps, "per_gpu": tps, "mfu_%": None,
                         "peak_gib": h["peak_mem_gib"], "step_peak_gib": h["step_peak_mem_gib"]})
            rows[0]["vs_hf"] = rows[0]["per_gpu"] / tps
    if args.profile:
        print(summarize_trace(Path(args.profile) / "profile_rank0.json", steps=2))
    return {"model": args.model, "seq_length": args.seq_length, "rows": rows}


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


# ---- where a profiled step's GPU time goes: a Chrome trace from `bridge train --profile` -> a short table ----

#: Kernel families, first match wins: communication, attention, matmul, optimizer, torch.compile's Triton kernels.
FAMILIES: list[tuple[str, re.Pattern[str]]] = [
    ("communication", re.compile(r"nccl|allreduce|allgather|reducescatter", re.I)),
    ("attention", re.compile(r"cudnn|fmha|flash|attention|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|sm80_|cublas", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("triton (torch.compile)", re.compile(r"^triton_|^Triton", re.I)),
    ("memset/memcpy", re.compile(r"^Memset|^Memcpy|memset|memcpy", re.I)),
]


def _busy_us(events: list[dict]) -> float:
    """Length of the union of the events' intervals (µs): overlapping streams count once."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return total


def summarize_trace(path: Path, steps: int, top: int = 25) -> str:
    """Step span, GPU busy and idle time, device time per kernel family and the most expensive kernels, per step."""
    if not path.is_file():
        return f"{path}: no trace (a CPU run writes none)"
    events = [e for e in json.loads(path.read_text()).get("traceEvents", [])
              if e.get("cat") in {"kernel", "gpu_memcpy", "gpu_memset"} and e.get("ph") == "X"]
    if not events:
        return f"{path}: no GPU kernels in the trace (a CPU run?)"
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    busy = _busy_us(events)
    per_family: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        per_family[next((f for f, pattern in FAMILIES if pattern.search(e["name"])), "other ATen")] += e["dur"]
        per_kernel[e["name"]][0] += e["dur"]
        per_kernel[e["name"]][1] += 1
    ms = lambda us: us / 1000 / steps  # noqa: E731  (per step)
    lines = [f"per step: span {ms(span):.1f} ms, GPU busy {ms(busy):.1f} ms, idle {ms(span - busy):.1f} ms",
             f"{'family':<24}{'ms/step':>10}{'share':>8}"]
    lines += [f"{f:<24}{ms(us):>10.2f}{100 * us / busy:>7.1f}%"
              for f, us in sorted(per_family.items(), key=lambda kv: -kv[1])]
    lines += [f"{'ms/step':>9}{'calls':>7}  kernel"]
    lines += [f"{ms(us):>9.2f}{n // steps:>7}  {name[:110]}"
              for name, (us, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]]
    return "\n".join(lines)
