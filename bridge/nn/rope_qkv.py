"""linear_qkv's output -> rotated q, k and v in one hand-written Triton kernel (and one for the backward).

Why by hand: torch.compile's split + RoPE (a negated half concatenated to the other, masked loads) moves
its bytes at a fraction of the GPU's memory bandwidth (docs/performance.md has the figures). Here one
program moves one head's [BLOCK_S, d] tile: it reads the two halves of each row as separate vectors (no
`cat` of a negated half, no masked loads), rotates them in fp32 with the position's cos/sin and writes
the tile where attention reads it. The backward applies the transposed rotation and writes each head's
gradient straight into its columns of d(qkv), so no concatenation follows.

The ops are registered with `torch.library.triton_op`, so torch.compile keeps them inside a layer's
graph. They run where Triton does: on CUDA, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1,
read when a kernel is defined), which is how CI, without a GPU, runs the same kernel code on fp32
tensors; `supported()` says when. The CPU-only torch wheel comes without Triton. Elsewhere
`SelfAttention` keeps the plain formula (`bridge.nn.rope.apply_rope`), which is also the reference the
tests hold these kernels to.

Layout: qkv is [s, b, groups * (heads_per_group + 2) * d] (Megatron's query-group-interleaved rows:
each group's query heads, then its key head, then its value head). q, k, v come back as [s, b, heads, d],
contiguous, the layout the rest of the attention block uses.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

BLOCK_S = 32
_enabled = True


def set_rope_fusion(enabled: bool) -> None:
    """`--no-rope-fusion` (Megatron-LM's flag): keep the plain formula even where the kernels could run.
    Process-wide, like the attention backend, and to be set before torch.compile traces a layer."""
    global _enabled
    _enabled = enabled


def supported(qkv: torch.Tensor, head_dim: int) -> bool:
    """Whether the Triton kernels run here: enabled, a device Triton runs on, and a head dim whose half is
    a power of two (`tl.arange`'s rule; 64 and 128 are)."""
    half = head_dim // 2
    if not (_enabled and HAS_TRITON and head_dim % 2 == 0 and half > 0 and half & (half - 1) == 0):
        return False
    return qkv.is_cuda or (qkv.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if HAS_TRITON:

    @triton.jit
    def _slot_and_output(slot, b, q, k, v, sq_s, sq_b, sq_h, skv_s, skv_b, skv_h, HPG: tl.constexpr):
        """Which head of which output a qkv column block (`slot`) is, and whether it is rotated."""
        group = slot // (HPG + 2)
        index = slot % (HPG + 2)
        if index < HPG:
            base = q + b * sq_b + (group * HPG + index) * sq_h
            s_stride = sq_s
        elif index == HPG:
            base = k + b * skv_b + group * skv_h
            s_stride = skv_s
        else:
            base = v + b * skv_b + group * skv_h
            s_stride = skv_s
        return base, s_stride, index <= HPG

    @triton.jit
    def _tile(S, BLOCK_S: tl.constexpr, D: tl.constexpr):
        """This program's batch index, qkv column block (`slot`), positions, half-row offsets and row mask."""
        block, b, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = (block * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
        return b, slot, rows, tl.arange(0, D // 2), (rows < S)[:, None]

    @triton.jit
    def _load_halves(ptr, mask, D: tl.constexpr):
        """The two halves of each row of a [BLOCK_S, D] tile, in fp32: rotate-half without masked loads."""
        return tl.load(ptr, mask=mask).to(tl.float32), tl.load(ptr + D // 2, mask=mask).to(tl.float32)

    @triton.jit
    def _load_tables(cos, sin, rows, b, sc_s, sc_b, half, mask, D: tl.constexpr):
        """cos and sin at this tile's positions, each as its two halves: (c1, c2, s1, s2). cos and sin share strides."""
        table = rows[:, None] * sc_s + b * sc_b + half[None, :]
        c1, c2 = _load_halves(cos + table, mask, D)
        s1, s2 = _load_halves(sin + table, mask, D)
        return c1, c2, s1, s2

    @triton.jit
    def _store_halves(ptr, first, second, mask, D: tl.constexpr):
        tl.store(ptr, first.to(ptr.dtype.element_ty), mask=mask)
        tl.store(ptr + D // 2, second.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_qkv_fwd(qkv, cos, sin, q, k, v, S, sx_s, sx_b, sc_s, sc_b, sq_s, sq_b, sq_h, skv_s, skv_b, skv_h,
                      HPG: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
        b, slot, rows, half, mask = _tile(S, BLOCK_S, D)
        x1, x2 = _load_halves(qkv + rows[:, None] * sx_s + b * sx_b + slot * D + half[None, :], mask, D)
        base, s_stride, rotate = _slot_and_output(slot, b, q, k, v, sq_s, sq_b, sq_h, skv_s, skv_b, skv_h, HPG)
        if rotate:
            c1, c2, s1, s2 = _load_tables(cos, sin, rows, b, sc_s, sc_b, half, mask, D)
            x1, x2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
        _store_halves(base + rows[:, None] * s_stride + half[None, :], x1, x2, mask, D)

    @triton.jit
    def _rope_qkv_bwd(dq, dk, dv, cos, sin, dqkv, S, sx_s, sx_b, sc_s, sc_b, sq_s, sq_b, sq_h, skv_s, skv_b, skv_h,
                      HPG: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
        b, slot, rows, half, mask = _tile(S, BLOCK_S, D)
        base, s_stride, rotate = _slot_and_output(slot, b, dq, dk, dv, sq_s, sq_b, sq_h, skv_s, skv_b, skv_h, HPG)
        g1, g2 = _load_halves(base + rows[:, None] * s_stride + half[None, :], mask, D)
        if rotate:  # the transpose of the forward's rotation
            c1, c2, s1, s2 = _load_tables(cos, sin, rows, b, sc_s, sc_b, half, mask, D)
            g1, g2 = g1 * c1 + g2 * s2, g2 * c2 - g1 * s1
        _store_halves(dqkv + rows[:, None] * sx_s + b * sx_b + slot * D + half[None, :], g1, g2, mask, D)

    def _grid(s: int, b: int, groups: int, hpg: int) -> tuple[int, int, int]:
        return (triton.cdiv(s, BLOCK_S), b, groups * (hpg + 2))

    def _table_strides(table: torch.Tensor) -> tuple[int, int]:
        """cos/sin are [s, b, 1, d] (b may be a broadcast, stride 0) with a contiguous last dim."""
        return table.stride(0), table.stride(1)

    def _unit_last_stride(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The kernels step through the last dim one element at a time: others are made contiguous."""
        return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)

    def _alike(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two tensors the kernel addresses with one set of strides (cos and sin; dk and dv): made contiguous
        when their strides differ."""
        return (a, b) if a.stride() == b.stride() else (a.contiguous(), b.contiguous())

    @triton_op("bridge::rope_qkv", mutates_args=())
    def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: int,
                 heads_per_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [s, b, groups * (hpg + 2) * d] -> rotated q [s, b, groups * hpg, d], rotated k and v [s, b, groups, d]."""
        qkv, cos, sin = _unit_last_stride(qkv, cos, sin)
        cos, sin = _alike(cos, sin)
        s, b, width = qkv.shape
        d = width // (groups * (heads_per_group + 2))
        q = qkv.new_empty(s, b, groups * heads_per_group, d)
        k, v = qkv.new_empty(s, b, groups, d), qkv.new_empty(s, b, groups, d)
        wrap_triton(_rope_qkv_fwd)[_grid(s, b, groups, heads_per_group)](
            qkv, cos, sin, q, k, v, s, qkv.stride(0), qkv.stride(1), *_table_strides(cos),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            HPG=heads_per_group, D=d, BLOCK_S=BLOCK_S)
        return q, k, v

    @triton_op("bridge::rope_qkv_backward", mutates_args=())
    def rope_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, groups: int, heads_per_group: int) -> torch.Tensor:
        """Gradients of q, k, v ([s, b, heads, d], any strides but a contiguous last dim) -> d(qkv)."""
        dq, dk, dv, cos, sin = _unit_last_stride(dq, dk, dv, cos, sin)
        (dk, dv), (cos, sin) = _alike(dk, dv), _alike(cos, sin)
        s, b, _, d = dq.shape
        dqkv = dq.new_empty(s, b, groups * (heads_per_group + 2) * d)
        wrap_triton(_rope_qkv_bwd)[_grid(s, b, groups, heads_per_group)](
            dq, dk, dv, cos, sin, dqkv, s, dqkv.stride(0), dqkv.stride(1), *_table_strides(cos),
            dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            HPG=heads_per_group, D=d, BLOCK_S=BLOCK_S)
        return dqkv

    def _setup_context(ctx, inputs, output) -> None:
        _, cos, sin, groups, heads_per_group = inputs
        ctx.save_for_backward(cos, sin)
        ctx.groups, ctx.heads_per_group = groups, heads_per_group

    def _backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        dqkv = rope_qkv_backward(dq, dk, dv, cos, sin, ctx.groups, ctx.heads_per_group)
        return dqkv, None, None, None, None

    rope_qkv.register_autograd(_backward, setup_context=_setup_context)
