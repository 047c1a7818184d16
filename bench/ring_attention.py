"""Context-parallel attention alone: the ring (p2p) against the all-gather and a2a, on GPUs (issue 9's "pick by
measurement").

    python bench/ring_attention.py --cps 2,4 --seq-length 32768 --check-length 4096

For each CP degree, CP ranks (one GPU each, NCCL) first check each exchange against attention over the whole
sequence at --check-length: the max abs error of the output and of the q/k/v gradients, bf16, next to that of
PyTorch's own bf16 SDPA, all against an fp32 reference. Then each times forward + backward of its two chunks at
--seq-length, once per exchange and --attention-backend; the slowest rank's median counts. CP=1 is PyTorch's causal
SDPA on the whole sequence, on one GPU. --shape picks the heads: the 1B shape (32 query heads, 8 KV heads, d 64), or
DeepSeek-V3's MLA at TP=8 (16 heads, q/k 192, v 128; the ring pads v to 192), or that with v 192 (what the padding
costs on one GPU, against "mla" at CP=1).
CPU smoke test of the script (gloo, short sequences): python bench/ring_attention.py --smoke
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
#: --shape -> (query heads, K/V heads, q/k head size, v head size)
SHAPES = {"llama-1b": (32, 8, 64, 64), "mla": (16, 16, 192, 128), "mla-v192": (16, 16, 192, 192)}


def _inputs(seq: int, dtype: torch.dtype, requires_grad: bool = True) -> list[torch.Tensor]:
    device = _device()
    g = torch.Generator(device=device).manual_seed(0)
    heads, groups, dim, v_dim = SHAPES[os.environ.get("RING_BENCH_SHAPE", "llama-1b")]
    shapes = [(1, heads, seq, dim), (1, groups, seq, dim), (1, groups, seq, v_dim), (1, heads, seq, v_dim)]
    q, k, v, dout = (torch.randn(s, generator=g, device=device).to(dtype) for s in shapes)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)] + [dout]


def _device() -> str:
    return "cpu" if os.environ.get("RING_BENCH_SMOKE") else "cuda"


def _exchange(name: str):  # noqa: ANN202
    import torch.distributed as dist

    from bridge.nn.transformer import CoreAttention
    from bridge.parallel.context import cp_attention
    from bridge.parallel.ring import ring_attention

    cp, rank = dist.get_world_size(), dist.get_rank()
    if name == "p2p":
        return lambda q, k, v: ring_attention(q, k, v, group=dist.group.WORLD, cp=cp, cp_rank=rank)
    if name == "a2a":  # CoreAttention takes [s, b, heads, d]; this script's tensors are [b, heads, s, d]
        attention = CoreAttention(None, cp=cp, cp_rank=rank, cp_group=dist.group.WORLD, cp_comm_type="a2a")
        return lambda q, k, v: attention(*(t.permute(2, 0, 1, 3) for t in (q, k, v))).permute(1, 2, 0, 3)
    return lambda q, k, v: cp_attention(q, k, v, group=dist.group.WORLD, cp=cp, cp_rank=rank)


def _errors(check_length: int, backend: str) -> dict[str, float]:
    """Max abs error against fp32 attention (math kernel) of the output and q/k/v gradients: bf16 SDPA on the whole
    sequence, each exchange in bf16, and (auto only) the ring in fp32, whose blocks run the plain math."""
    import torch.distributed as dist

    from bridge.nn.attention import set_attention_backend
    from bridge.parallel.context import split_sequence

    cp, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, dout = _inputs(check_length, torch.float32)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.backward(dout)
    local = lambda t: split_sequence(t.detach(), cp, rank, dim=2)  # noqa: E731
    refs = [local(ref)] + [local(t.grad) for t in (q, k, v)]
    set_attention_backend(backend)
    out = {}
    for name in ("sdpa", "p2p", "all_gather", "a2a") + (("p2p_fp32",) if backend == "auto" else ()):  # no fp32 flash
        if name == "sdpa":
            q16, k16, v16 = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
            try:
                o = F.scaled_dot_product_attention(q16, k16, v16, is_causal=True, enable_gqa=True)
            except RuntimeError:  # the backend cannot run the shape (flash with MLA's two head sizes)
                out[name] = None
                continue
            o.backward(dout.bfloat16())
            got = [local(o)] + [local(t.grad) for t in (q16, k16, v16)]
        else:
            dtype = torch.float32 if name.endswith("fp32") else torch.bfloat16
            parts = [local(t).to(dtype).requires_grad_() for t in (q, k, v)]
            o = _exchange(name.removesuffix("_fp32"))(*parts)
            o.backward(local(dout).to(dtype))
            got = [o] + [t.grad for t in parts]
        out[name] = max((a.float() - b).abs().max().item() for a, b in zip(got, refs))
    return out


def _time(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, iters: int) -> float:  # noqa: ANN001
    import torch.distributed as dist

    times = []
    for i in range(iters + 3):
        dist.barrier() if dist.is_initialized() else None
        torch.cuda.synchronize() if q.is_cuda else None
        start = time.perf_counter()
        fn(q, k, v).backward(dout)
        torch.cuda.synchronize() if q.is_cuda else None
        if i >= 3:
            times.append((time.perf_counter() - start) * 1e3)
        q.grad = k.grad = v.grad = None
    return statistics.median(times)


def rank_main(seq: int, check_length: int, backends: list[str], iters: int) -> dict:
    import torch.distributed as dist

    from bridge.nn.attention import set_attention_backend
    from bridge.parallel.context import split_sequence

    from bridge.nn.attention import block_kernel

    cp, rank = dist.get_world_size(), dist.get_rank()
    result = {"errors": {b: _errors(check_length, b) for b in backends}, "ms": {}, "kernels": {}}
    q, k, v, dout = (split_sequence(t.detach(), cp, rank, dim=2) for t in _inputs(seq, torch.bfloat16, False))
    q, k, v = (t.contiguous().requires_grad_() for t in (q, k, v))
    half = q.shape[2] // 2
    for backend in backends:
        set_attention_backend(backend)
        blocks = {"own": (q, k, v, True), "earlier": (q, k[:, :, :half], v[:, :, :half], False),
                  "later": (q[:, :, half:], k, v, False)}
        result["kernels"][backend] = {b: block_kernel(*args).name for b, args in blocks.items()}
        for name in ("p2p", "all_gather", "a2a"):
            result["ms"][f"{name}/{backend}"] = _time(_exchange(name), q, k, v, dout.contiguous(), iters)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if q.is_cuda else None
    return result


def _worst(errors) -> float | None:  # noqa: ANN001
    """The largest of the ranks' errors; None where the backend could not run the check."""
    known = [e for e in errors if e is not None]
    return max(known) if known else None


def single_gpu(seq: int, backends: list[str], iters: int) -> dict:
    from bridge.nn.attention import set_attention_backend

    q, k, v, dout = _inputs(seq, torch.bfloat16)
    out = {}
    for backend in backends:
        set_attention_backend(backend)
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        try:
            out[f"sdpa/{backend}"] = _time(sdpa, q, k, v, dout, iters)
        except RuntimeError:  # the backend cannot run the shape (flash with MLA's two head sizes)
            out[f"sdpa/{backend}"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    from bridge.launch import launch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cps", default="2,4")
    p.add_argument("--seq-length", type=int, default=32768)
    p.add_argument("--check-length", type=int, default=4096)
    p.add_argument("--backends", default="auto,flash", help="--attention-backend values to time")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    p.add_argument("--json")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, short sequences: checks the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["RING_BENCH_SMOKE"] = "1"  # inherited by the spawned ranks
        args.seq_length, args.check_length, args.backends, args.iters, args.cps = 256, 64, "auto", 1, "2"
    os.environ["RING_BENCH_SHAPE"] = args.shape  # inherited by the spawned ranks
    backends = args.backends.split(",")
    comm = "gloo" if args.smoke else "nccl"
    results = {"device": "cpu" if args.smoke else torch.cuda.get_device_name(), "seq_length": args.seq_length,
               "shape": args.shape,
               "cp1": single_gpu(args.seq_length, backends, args.iters)}
    print(f"cp=1: {json.dumps(results['cp1'])}", flush=True)
    for cp in [int(c) for c in args.cps.split(",")]:
        ranks = launch(rank_main, cp, args.seq_length, args.check_length, backends, args.iters, backend=comm)
        summary = {"ms_slowest_rank": {k: max(r["ms"][k] for r in ranks) for k in ranks[0]["ms"]},
                   "max_abs_error": {b: {n: _worst(r["errors"][b][n] for r in ranks) for n in ranks[0]["errors"][b]}
                                     for b in backends},
                   "peak_gib": max((r["peak_gib"] or 0) for r in ranks), "kernels": ranks[0]["kernels"]}
        results[f"cp{cp}"] = summary
        print(f"cp={cp}: {json.dumps(summary)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
