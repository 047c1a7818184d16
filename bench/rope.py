"""The attention block between linear_qkv and linear_proj (split, RoPE, SDPA), forward + backward, per RoPE variant.

    python bench/rope.py            # CUDA, torch.compile'd like `bridge train --compile`

The profile of a 1B training step showed the RoPE kernels (forward and backward) at ~10 ms of 278 on an
H100, several times their memory traffic. This compares ways of writing the rotation, all compiled:
  cat:     x * cos + cat(-x2, x1) * sin on [s, b, heads, d] (transformers' rotate_half, bridge's original)
  halves:  the two halves rotated separately with half-width tables, then one cat (no negated copy)
  flip:    x * cos + [x2, x1] * [-sin, sin]: the halves swapped by a flip (an index remap, no masked loads)
  triton:  bridge.nn.rope_qkv, the hand-written split + RoPE kernels (forward and backward) that `bridge train`
           uses on CUDA (`--no-rope-fusion` turns them off)
Each variant is checked against `cat` (max abs difference of the outputs and of the input gradient).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: (s, b, query groups, heads per group, d)
    "1b-mbs4": (2048, 4, 8, 4, 64),
    "8b-tp4-mbs2": (4096, 2, 2, 4, 128),
}


def rope_cat(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rope_flip(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # [x2, x1]: an index remap, no masked loads
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # small table: [s, b, 1, d]
    return x * cos + swapped * signed_sin


VARIANTS = {"cat": rope_cat, "halves": rope_halves, "flip": rope_flip}


def split_qkv(qkv: torch.Tensor, groups: int, hpg: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """linear_qkv's output [s, b, groups * (hpg + 2) * d] -> q [s, b, heads, d], k and v [s, b, groups, d]."""
    s, b = qkv.shape[:2]
    q, k, v = qkv.view(s, b, groups, (hpg + 2) * d).split([hpg * d, d, d], dim=-1)
    return q.reshape(s, b, groups * hpg, d), k, v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[b, heads, s, d] in, [s, b, heads * d] out."""
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return out.permute(2, 0, 1, 3).flatten(2)


def block(rope, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: int, hpg: int, d: int) -> torch.Tensor:
    """bridge's SelfAttention.forward between its two linears."""
    q, k, v = split_qkv(qkv, groups, hpg, d)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    return attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)))


def block_bhsd(rope, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: int, hpg: int,
               d: int) -> torch.Tensor:
    """The same with q/k moved to SDPA's [b, heads, s, d] before the rotation (so RoPE writes SDPA's layout)."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in split_qkv(qkv, groups, hpg, d))
    cos, sin = cos.permute(1, 2, 0, 3), sin.permute(1, 2, 0, 3)
    return attention(rope(q, cos, sin), rope(k, cos, sin), v)


def block_triton(_rope, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: int, hpg: int,
                 d: int) -> torch.Tensor:
    """The block as `bridge train` runs it on CUDA: bridge.nn.rope_qkv's kernels instead of the rotation formula."""
    from bridge.nn.rope_qkv import rope_qkv

    q, k, v = rope_qkv(qkv, cos, sin, groups, hpg)
    return attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)))


def rope_only(rope, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: int, hpg: int, d: int) -> torch.Tensor:
    q, k, v = split_qkv(qkv, groups, hpg, d)
    return torch.cat([t.flatten(2) for t in (rope(q, cos, sin), rope(k, cos, sin), v)], dim=-1)


def timed(fn, qkv: torch.Tensor, grad: torch.Tensor, iters: int) -> float:
    for _ in range(3):
        fn(qkv).backward(grad)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn(qkv).backward(grad)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args(argv)
    from bridge.nn.attention import set_attention_backend

    set_attention_backend("auto")
    results = {"device": torch.cuda.get_device_name()}
    for name, (s, b, groups, hpg, d) in SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        qkv = torch.randn(s, b, groups * (hpg + 2) * d, device="cuda", dtype=torch.bfloat16, generator=gen)
        theta = torch.arange(s, device="cuda").float()[:, None] * torch.rand(d // 2, device="cuda", generator=gen)
        emb = torch.cat([theta, theta], -1)[:, None, None, :].expand(s, b, 1, d)
        cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
        reference = {}
        parts = [("block", block, VARIANTS), ("block-bhsd", block_bhsd, VARIANTS),
                 ("block", block_triton, {"triton": None}), ("rope", rope_only, VARIANTS)]
        for part, fn, variants in parts:
            for variant, rope in variants.items():
                compiled = torch.compile(lambda x, r=rope, f=fn: f(r, x, cos, sin, groups, hpg, d))
                x = qkv.clone().requires_grad_()
                out = compiled(x)
                grad = torch.randn(out.shape, device="cuda", dtype=out.dtype,
                                   generator=torch.Generator(device="cuda").manual_seed(1))
                out.backward(grad)
                ref = reference.setdefault(part.split("-")[0], (out.detach(), x.grad.clone()))
                diff = max((out - ref[0]).abs().max().item(), (x.grad - ref[1]).abs().max().item())
                ms = timed(compiled, qkv.clone().requires_grad_(), grad, args.iters)
                results[f"{name}/{part}/{variant}"] = {"ms": ms, "max_abs_vs_cat": diff}
                print(f"{name:>12} {part:>5} {variant:>8}: {ms:7.3f} ms  max|diff| {diff:.2e}", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
