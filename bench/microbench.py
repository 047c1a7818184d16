"""Kernel micro-benchmarks (suite kernels): attention backends, RoPE formulations, context-parallel attention, the
output layer with its loss.

    python bench/run.py kernels --parts attention,rope          # one H100
    python bench/run.py kernels --parts loss                    # one H100
    python bench/run.py kernels --parts ring --cps 2,4          # four H100s: the K/V exchanges of CP attention
    python bench/run.py kernels --parts ring --cps 2 --ring-shape mla

attention: causal grouped-query attention forward + backward per SDPA backend (flash, cuDNN, memory-efficient),
  with K/V passed as they are (enable_gqa) or expanded, at the shapes bridge trains: which backend order
  `bridge.nn.attention` uses. TFLOP/s counts the causal half of the square, backward as 2.5x forward.
rope: the attention block between linear_qkv and linear_proj (split, RoPE, SDPA), forward + backward, compiled,
  per way of writing the rotation: `cat` (transformers' rotate_half), `halves`, `flip`, and `triton`
  (bridge.nn.rope_qkv, what `bridge train` runs on CUDA), each checked against `cat`.
loss: the output layer and the cross entropy, forward + backward, bf16, at the 8B shape's step (8,192 tokens, hidden
  4,096, vocabulary 128,256) and the 1B shape's (hidden 2,048), the weight gradient into an fp32 buffer: the logits
  whole (`--no-linear-cross-entropy-fusion`), bridge's chunks (bridge.nn.linear_cross_entropy) at each of
  --loss-chunks logits per chunk, and HF's way (fp32 logits, F.cross_entropy, compiled): ms and the peak memory
  above the inputs and buffers, each against the logits path's loss and gradients.
ring: one layer's attention under CP, one GPU per rank (NCCL): each exchange (the ring `p2p`, `all_gather`,
  `a2a`) per --attention-backend, forward + backward of the rank's two chunks, the slowest rank's median; CP=1 is
  SDPA over the whole sequence on one GPU. Each exchange is first checked at --check-length against fp32
  attention over the whole sequence (the largest error of the output and the q/k/v gradients), next to
  PyTorch's own bf16 SDPA. --ring-shape: the 1B shape's heads, DeepSeek-V3's MLA at TP=8 (16 heads, q/k 192,
  v 128), or that with v 192.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

#: attention shapes: (batch, query heads, kv heads, sequence, head dim)
ATTENTION_SHAPES = {"1b-mbs4": (4, 32, 8, 2048, 64), "8b-tp4": (1, 8, 2, 4096, 128), "8b-tp1": (1, 32, 8, 4096, 128),
                    "1b-seq32k-cp4": (1, 32, 8, 8192, 64)}
#: RoPE block shapes: (sequence, batch, query groups, heads per group, head dim)
ROPE_SHAPES = {"1b-mbs4": (2048, 4, 8, 4, 64), "8b-tp4-mbs2": (4096, 2, 2, 4, 128)}
#: loss shapes: (tokens, hidden, vocabulary)
LOSS_SHAPES = {"8b-mbs2-seq4096": (8192, 4096, 128256), "1b-mbs4-seq2048": (8192, 2048, 128256)}
#: ring shapes: (query heads, K/V heads, q/k head size, v head size)
RING_SHAPES = {"llama-1b": (32, 8, 64, 64), "mla": (16, 16, 192, 128), "mla-v192": (16, 16, 192, 192)}


def configure(p: argparse.ArgumentParser, suite: str) -> None:
    p.add_argument("--parts", default="attention,rope,ring,loss", help="of attention, rope, ring, loss")
    p.add_argument("--loss-chunks", default="27,28,29", help="loss: log2 of the logits per chunk, comma-separated")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--cps", default="2,4", help="ring: CP degrees (one GPU per rank)")
    p.add_argument("--seq-length", type=int, default=32768, help="ring: sequence length timed")
    p.add_argument("--check-length", type=int, default=4096, help="ring: sequence length checked against fp32")
    p.add_argument("--backends", default="auto,flash", help="ring: --attention-backend values")
    p.add_argument("--ring-shape", choices=sorted(RING_SHAPES), default="llama-1b")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _ms(fn: Callable[[], Any], device: str, iters: int, *, each: bool = False, warmup: int = 3) -> float:
    """Time of one fn() in ms: the mean over `iters` calls queued back to back (the kernels' own time), or with
    `each` the median of calls timed one by one (a collective's slowest rank decides each call)."""
    for _ in range(warmup):
        fn()
    if not each:
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        return (time.perf_counter() - start) * 1e3 / iters
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def attention_rows(shapes: dict, backends: dict, device: str, iters: int) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    rows = []
    for name, (b, hq, hkv, s, d) in shapes.items():
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, requires_grad=True) for h in (hq, hkv, hkv))
        grad = torch.randn(b, hq, s, d, device=device, dtype=torch.bfloat16)
        ref = None
        for bname, backend in backends.items():
            for gqa in ("native", "expanded"):
                def step() -> torch.Tensor:
                    with sdpa_kernel([backend]):
                        kk, vv = (k, v) if gqa == "native" else (t.repeat_interleave(hq // hkv, 1) for t in (k, v))
                        out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa == "native")
                    out.backward(grad)
                    return out
                row = {"part": "attention", "shape": name, "kernel": f"{bname}/{gqa}"}
                try:
                    out = step().detach().float()
                except RuntimeError as exc:  # a backend that cannot run the shape says why
                    rows.append({**row, "error": str(exc).splitlines()[0][:100]})
                    continue
                ref = out if ref is None else ref
                ms = _ms(step, device, iters)
                rows.append({**row, "ms": ms, "tflops": 4 * b * hq * s * s * d / 2 * 3.5 / ms / 1e9,
                             "max_diff": (out - ref).abs().max().item()})
    return rows


def _rope_variants() -> dict[str, Callable]:
    import torch

    def cat(x, cos, sin):  # noqa: ANN001, ANN202
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def halves(x, cos, sin):  # noqa: ANN001, ANN202
        h = x.shape[-1] // 2
        x1, x2, c, s = x[..., :h], x[..., h:], cos[..., :h], sin[..., :h]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    def flip(x, cos, sin):  # noqa: ANN001, ANN202
        h = x.shape[-1] // 2
        swapped = x.unflatten(-1, (2, h)).flip(-2).flatten(-2)  # [x2, x1]: an index remap, no masked loads
        return x * cos + swapped * torch.cat((-sin[..., :h], sin[..., h:]), dim=-1)

    return {"cat": cat, "halves": halves, "flip": flip}


def rope_rows(shapes: dict, device: str, iters: int, compile: bool) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    def block(rope, qkv, cos, sin, g, hpg, d):  # noqa: ANN001, ANN202 - SelfAttention.forward between its linears
        if rope is None:  # bridge's Triton kernels
            from bridge.nn.rope_qkv import rope_qkv
            q, k, v = rope_qkv(qkv, cos, sin, g, hpg)
        else:
            s, b = qkv.shape[:2]
            q, k, v = qkv.view(s, b, g, (hpg + 2) * d).split([hpg * d, d, d], dim=-1)
            q, k = rope(q.reshape(s, b, g * hpg, d), cos, sin), rope(k, cos, sin)
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True, enable_gqa=True)
        return out.permute(2, 0, 1, 3).flatten(2)  # [s, b, heads * d]

    variants = {**_rope_variants(), **({"triton": None} if device == "cuda" else {})}
    rows = []
    for name, (s, b, g, hpg, d) in shapes.items():
        gen = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(s, b, g * (hpg + 2) * d, device=device, dtype=torch.bfloat16, generator=gen)
        theta = torch.arange(s, device=device).float()[:, None] * torch.rand(d // 2, device=device, generator=gen)
        emb = torch.cat([theta, theta], -1)[:, None, None, :].expand(s, b, 1, d)
        cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
        ref = None
        for vname, rope in variants.items():
            fn = lambda x, r=rope: block(r, x, cos, sin, g, hpg, d)  # noqa: E731
            fn = torch.compile(fn) if compile else fn
            x = qkv.clone().requires_grad_()
            out = fn(x)
            gen1 = torch.Generator(device=device).manual_seed(1)
            grad = torch.randn(out.shape, device=device, dtype=out.dtype, generator=gen1)
            out.backward(grad)
            ref = ref or (out.detach(), x.grad.clone())
            diff = max((out - ref[0]).abs().max().item(), (x.grad - ref[1]).abs().max().item())
            y = qkv.clone().requires_grad_()
            rows.append({"part": "rope block", "shape": name, "kernel": vname,
                         "ms": _ms(lambda: fn(y).backward(grad), device, iters), "max_diff": diff})
    return rows


def _ring_inputs(seq: int, shape: str, device: str, dtype, requires_grad: bool = True) -> list:  # noqa: ANN001
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    heads, groups, dim, v_dim = RING_SHAPES[shape]
    shapes = [(1, heads, seq, dim), (1, groups, seq, dim), (1, groups, seq, v_dim), (1, heads, seq, v_dim)]
    q, k, v, dout = (torch.randn(s, generator=g, device=device).to(dtype) for s in shapes)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)] + [dout]


def _exchange(name: str) -> Callable:
    import torch.distributed as dist

    from bridge.nn.attention import block_kernel
    from bridge.nn.core_attention import CoreAttention
    from bridge.parallel.context import cp_attention
    from bridge.parallel.ring import ring_attention

    cp, rank, group = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    if name == "p2p":
        return lambda q, k, v: ring_attention(q, k, v, group=group, cp=cp, cp_rank=rank, kernel_for=block_kernel)
    if name == "a2a":  # CoreAttention takes [s, b, heads, d]; these tensors are [b, heads, s, d]
        attention = CoreAttention(None, cp=cp, cp_rank=rank, cp_group=group, cp_comm_type="a2a")
        return lambda q, k, v: attention(*(t.permute(2, 0, 1, 3) for t in (q, k, v))).permute(1, 2, 0, 3)
    return lambda q, k, v: cp_attention(q, k, v, group=group, cp=cp, cp_rank=rank)


def _ring_errors(check_length: int, shape: str, device: str) -> dict[str, float | None]:
    """Largest abs error against fp32 attention (math kernel) of the output and q/k/v gradients: bf16 SDPA on the
    whole sequence, then each exchange in bf16."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from bridge.parallel.context import split_sequence

    cp, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, dout = _ring_inputs(check_length, shape, device, torch.float32)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.backward(dout)
    local = lambda t: split_sequence(t.detach(), cp, rank, dim=2)  # noqa: E731
    refs = [local(ref)] + [local(t.grad) for t in (q, k, v)]
    out: dict[str, float | None] = {}
    for name in ("sdpa", "p2p", "all_gather", "a2a"):
        if name == "sdpa":
            parts = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
            try:
                o = F.scaled_dot_product_attention(*parts, is_causal=True, enable_gqa=True)
            except RuntimeError:  # the backend cannot run the shape (flash with MLA's two head sizes)
                out[name] = None
                continue
            o.backward(dout.bfloat16())
            got = [local(o)] + [local(t.grad) for t in parts]
        else:
            parts = [local(t).bfloat16().requires_grad_() for t in (q, k, v)]
            o = _exchange(name)(*parts)
            o.backward(local(dout).bfloat16())
            got = [o] + [t.grad for t in parts]
        out[name] = max((a.float() - b).abs().max().item() for a, b in zip(got, refs))
    return out


def _ring_rank(seq: int, check_length: int, backends: list[str], shape: str, device: str, iters: int) -> dict:
    """One CP rank: the errors per backend, then the time of each exchange per backend."""
    import torch
    import torch.distributed as dist

    from bridge.nn.attention import set_attention_backend
    from bridge.parallel.context import split_sequence

    cp, rank = dist.get_world_size(), dist.get_rank()
    result: dict[str, Any] = {"errors": {}, "ms": {}}
    for backend in backends:
        set_attention_backend(backend)
        result["errors"][backend] = _ring_errors(check_length, shape, device)
    q, k, v, dout = (split_sequence(t.detach(), cp, rank, dim=2).contiguous()
                     for t in _ring_inputs(seq, shape, device, torch.bfloat16, False))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for backend in backends:
        set_attention_backend(backend)
        for name in ("p2p", "all_gather", "a2a"):
            fn = _exchange(name)
            def step() -> None:
                dist.barrier()
                fn(q, k, v).backward(dout)
                q.grad = k.grad = v.grad = None
            result["ms"][f"{name}/{backend}"] = _ms(step, device, iters, each=True)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return result


def ring_rows(args: argparse.Namespace, device: str, backends: list[str]) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from bridge.launch import launch
    from bridge.nn.attention import set_attention_backend

    rows = []
    q, k, v, dout = _ring_inputs(args.seq_length, args.ring_shape, device, torch.bfloat16)
    for backend in backends:  # CP=1: SDPA over the whole sequence on one device
        set_attention_backend(backend)
        row = {"part": "cp attention", "shape": args.ring_shape, "cp": 1, "kernel": f"sdpa/{backend}"}
        try:
            ms = _ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(dout),
                     device, args.iters, each=True)
            rows.append({**row, "ms": ms})
        except RuntimeError as exc:  # flash with MLA's two head sizes
            rows.append({**row, "error": str(exc).splitlines()[0][:100]})
    for cp in (int(c) for c in args.cps.split(",")):
        if device == "cuda" and cp > torch.cuda.device_count():
            rows.append({"part": "cp attention", "shape": args.ring_shape, "cp": cp, "error": f"needs {cp} GPUs"})
            continue
        ranks = launch(_ring_rank, cp, args.seq_length, args.check_length, backends, args.ring_shape, device,
                       args.iters, backend="nccl" if device == "cuda" else "gloo")
        for key in ranks[0]["ms"]:
            exchange, backend = key.split("/")
            errors = [r["errors"][backend][exchange] for r in ranks]
            rows.append({"part": "cp attention", "shape": args.ring_shape, "cp": cp, "kernel": key,
                         "ms": max(r["ms"][key] for r in ranks), "max_err": max(errors),
                         "sdpa_bf16_err": max((r["errors"][backend]["sdpa"] or 0) for r in ranks),
                         "peak_gib": max((r["peak_gib"] or 0) for r in ranks) or None})
    return rows


def _loss_variants(tokens: int, hidden: int, vocab: int, device: str, chunks: list[int]) -> dict[str, Callable]:
    """name -> fn(hidden, weight, target, weights, main_grad) -> loss, gradients left in hidden.grad / main_grad."""
    import torch
    import torch.nn.functional as F

    from bridge.nn import linear_cross_entropy as lce
    from bridge.nn.cross_entropy import vocab_parallel_cross_entropy

    def logits_path(h, w, t, tw, main_grad):  # noqa: ANN001, ANN202
        loss = (vocab_parallel_cross_entropy(F.linear(h, w), t, None, 0) * tw).sum()
        loss.backward()
        main_grad.add_(w.grad)
        w.grad = None
        return loss

    def chunked(log2: int) -> Callable:
        def fn(h, w, t, tw, main_grad):  # noqa: ANN001, ANN202
            w.fuse_wgrad_accumulation, w.main_grad = True, main_grad
            loss = lce.linear_cross_entropy(h, w, t, tw, None, 0, rows=lce.chunk_rows(tokens, vocab, 2**log2))
            loss.backward()
            del w.fuse_wgrad_accumulation, w.main_grad
            return loss
        return fn

    def hf_loss(logits, t, tw):  # noqa: ANN001, ANN202
        return (F.cross_entropy(logits.float().flatten(0, 1), t.flatten(), reduction="none") * tw.flatten()).sum()

    hf_compiled = torch.compile(hf_loss) if device == "cuda" else hf_loss

    def hf_path(h, w, t, tw, main_grad):  # noqa: ANN001, ANN202
        loss = hf_compiled(F.linear(h, w), t, tw)
        loss.backward()
        main_grad.add_(w.grad)
        w.grad = None
        return loss

    return {"logits whole": logits_path, **{f"chunks of 2^{c} logits": chunked(c) for c in chunks},
            "HF: fp32 logits, compiled": hf_path}


def loss_rows(shapes: dict, device: str, iters: int, chunks: list[int]) -> list[dict[str, Any]]:
    import torch

    rows = []
    for shape, (tokens, hidden, vocab) in shapes.items():
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(tokens, 1, hidden, device=device, generator=g).bfloat16().requires_grad_()
        w = (torch.randn(vocab, hidden, device=device, generator=g) * 0.02).bfloat16().requires_grad_()
        t = torch.randint(0, vocab, (tokens, 1), device=device, generator=g)
        tw = torch.full((tokens, 1), 1.0 / tokens, device=device)
        main_grad = torch.zeros(vocab, hidden, device=device)
        ref = None
        for name, fn in _loss_variants(tokens, hidden, vocab, device, chunks).items():
            def step() -> Any:  # noqa: ANN401
                h.grad = None
                main_grad.zero_()
                return fn(h, w, t, tw, main_grad)

            loss = step()
            got = (loss.item(), h.grad.float().clone(), main_grad.clone())
            ref = ref or got
            err = max(abs(got[0] - ref[0]) / abs(ref[0]), *(((a - b).abs().max() / b.abs().max()).item()
                                                             for a, b in zip(got[1:], ref[1:])))
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            else:
                peak = None
            rows.append({"part": "loss", "shape": shape, "variant": name, "ms": _ms(step, device, iters),
                         "peak_above_inputs_gib": peak, "max_rel_diff_vs_logits": err})
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.nn.attention import SDPBackend

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    attention_shapes, rope_shapes, backends = ATTENTION_SHAPES, ROPE_SHAPES, args.backends.split(",")
    sdpa_backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                     "efficient": SDPBackend.EFFICIENT_ATTENTION}
    loss_shapes, loss_chunks = LOSS_SHAPES, [int(c) for c in args.loss_chunks.split(",")]
    if device == "cpu":  # CPU: the plain math only, tiny shapes, no compile: checks the code
        attention_shapes, rope_shapes = {"tiny": (1, 4, 2, 64, 16)}, {"tiny": (64, 1, 2, 2, 16)}
        loss_shapes, loss_chunks = {"tiny": (64, 16, 1000)}, [13]
        sdpa_backends, backends = {"math": SDPBackend.MATH}, ["auto"]
        args.seq_length, args.check_length, args.iters, args.cps = 128, 64, 2, "2"
    rows = []
    parts = args.parts.split(",")
    if "attention" in parts:
        rows += attention_rows(attention_shapes, sdpa_backends, device, args.iters)
    if "rope" in parts:
        rows += rope_rows(rope_shapes, device, args.iters, compile=device == "cuda")
    if "ring" in parts:
        rows += ring_rows(args, device, backends)
    if "loss" in parts:
        rows += loss_rows(loss_shapes, device, args.iters, loss_chunks)
    return {"rows": rows}
