"""Causal attention forward+backward per SDPA backend (flash, cuDNN, memory-efficient) on the GPU.

Picks the backend order `bridge.nn.attention` uses: which kernel is fastest for the shapes bridge
trains, and whether it takes grouped-query K/V directly (enable_gqa) or needs them expanded.
    python bench/attention.py                       # the 1B (1 GPU) and 8B-at-TP=4 shapes
"""
from __future__ import annotations

import argparse
import json
import sys

SHAPES = {  # name: (batch, query heads, kv heads, sequence, head dim)
    "1b-mbs4": (4, 32, 8, 2048, 64),
    "8b-tp4": (1, 8, 2, 4096, 128),
    "8b-tp1": (1, 32, 8, 4096, 128),
    "1b-seq32k-cp4": (1, 32, 8, 8192, 64),
}


def bench(shape: tuple[int, ...], backend, gqa: str, iters: int = 20) -> dict:  # noqa: ANN001
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    b, hq, hkv, s, d = shape
    torch.manual_seed(0)
    q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        with sdpa_kernel([backend]):
            if gqa == "native":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                rep = hq // hkv
                out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                     is_causal=True)
        out.backward(grad)
        return out

    try:
        out = step()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a backend that cannot run this shape says why
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        step()
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    flops = 4 * b * hq * s * s * d / 2 * 3.5  # causal: half the square; backward ~2.5x forward
    return {"ms": ms, "tflops": flops / ms / 1e9, "out": out.detach().float()}


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.nn.attention import SDPBackend

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default=",".join(SHAPES))
    args = p.parse_args(argv)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in args.shapes.split(","):
        ref = None
        for bname, backend in backends.items():
            for gqa in ("native", "expanded"):
                r = bench(SHAPES[name], backend, gqa)
                out = r.pop("out", None)
                if out is not None:
                    ref = out if ref is None else ref
                    r["max_abs_vs_first"] = (out - ref).abs().max().item()
                results[f"{name}/{bname}/{gqa}"] = r
                print(f"{name:>14} {bname:>9} {gqa:>8}: " + (r["error"] if "error" in r else
                      f"{r['ms']:7.3f} ms  {r['tflops']:6.1f} TFLOP/s  max|diff| {r['max_abs_vs_first']:.2e}"),
                      flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
