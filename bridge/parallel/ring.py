"""Ring attention for context parallelism (Megatron-LM's default `--cp-comm-type p2p`).

Each CP rank keeps its queries and passes its K/V block to the next rank, cp - 1 times; while one block is
in flight the rank computes attention against the block it holds, so the exchange hides behind the
kernels. Partial outputs are merged by each query row's softmax log-sum-exp. With the load-balanced
chunks (rank r holds chunks r and 2cp-1-r of 2cp, see bridge.parallel.context), the block from rank
s needs only one of three shapes at step > 0:

    s == r (step 0): both local chunks against both, causal over their concatenation (chunk r < 2cp-1-r);
    s < r: both query chunks against the source's first chunk (chunk s < r), no mask;
    s > r: only the second query chunk (2cp-1-r) against both source chunks, no mask;

so every rank does the same work at every step. Backward sends K/V around once more, and each block's
K/V gradient travels with it in fp32, arriving home after a full circle: the kernels' backward, given
the merged output and log-sum-exp, returns each block's exact share of the gradient. K and V travel as one flat
message, so they may differ in head size (MLA's v is narrower than its k) without padding the exchange.

The exchange is `torch.distributed.batch_isend_irecv` on the CP group (NCCL on GPUs, gloo in CI); the
kernels are log-sum-exp ones that the caller picks per block through `kernel_for` (bridge.nn.attention.block_kernel:
cuDNN, flash or plain math on CUDA, as SDPA would; the CPU flash kernel). The caller passes the chooser because
bridge.nn builds on this package, never the reverse.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bridge.parallel.collectives import Group

_ALL = slice(None)

#: (q, k, v, causal) -> a kernel pair with `forward(q, k, v, causal, scale) -> (out, lse, aux)` and
#: `backward(dout, q, k, v, out, lse, aux, causal, scale) -> (dq, dk, dv)`, e.g. bridge.nn.attention.block_kernel.
KernelFor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], Any]


class Ring:
    """This rank's neighbours in the CP group: `shift` sends a tensor to the next rank and receives the previous
    rank's, asynchronously."""

    def __init__(self, group: Group, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank
        self.next = dist.get_global_rank(group, (rank + 1) % size)
        self.prev = dist.get_global_rank(group, (rank - 1) % size)

    def shift(self, x: torch.Tensor) -> "Shifted":
        received = torch.empty_like(x)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, self.next, self.group),
                                        dist.P2POp(dist.irecv, received, self.prev, self.group)])
        return Shifted(works, received)


class Shifted:
    """A shift in flight: `wait()` returns the tensor received from the previous rank."""

    def __init__(self, works: list[dist.Work], received: torch.Tensor) -> None:
        self.works, self.received = works, received

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.received


def block_at(step: int, ring: Ring, half: int) -> tuple[slice, slice, bool]:
    """(query rows, key columns, causal) of the block this rank computes at `step` (it then holds the K/V of
    rank - step): see the module docstring."""
    source = (ring.rank - step) % ring.size
    if step == 0:
        return _ALL, _ALL, True
    if source < ring.rank:
        return _ALL, slice(0, half), False
    return slice(half, None), _ALL, False


def _merge(out: torch.Tensor, lse: torch.Tensor, rows: slice, block_out: torch.Tensor,
           block_lse: torch.Tensor) -> None:
    """Fold a block's (output, lse) into the running fp32 (out, lse) for query `rows`, in place."""
    old_out, old_lse = out[:, :, rows], lse[:, :, rows]
    new_lse = torch.logaddexp(old_lse, block_lse)
    old_out.mul_(torch.exp(old_lse - new_lse).unsqueeze(-1))
    old_out.add_(block_out.to(out.dtype) * torch.exp(block_lse - new_lse).unsqueeze(-1))
    old_lse.copy_(new_lse)


def _pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K and V as one flat message."""
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _packed_zeros(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A flat gradient buffer for K and V, laid out as `_pack`'s message."""
    return torch.zeros(k.numel() + v.numel(), dtype=dtype, device=k.device)


def _unpack(kv: torch.Tensor, k_shape: torch.Size, v_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a `_pack`ed message (writes through them land in it)."""
    n = k_shape.numel()
    return kv[:n].view(k_shape), kv[n:].view(v_shape)


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """Partial outputs and gradients add up in fp32 (or x's dtype, if wider)."""
    return torch.promote_types(x.dtype, torch.float32)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring,  # noqa: ANN001
                scale: float, kernel_for: KernelFor) -> torch.Tensor:
        half = q.shape[2] // 2
        kv = _pack(k, v)  # one message per step
        out = lse = None
        kernels = []  # per step: the kernel pair and what its backward needs from its forward
        for step in range(ring.size):
            incoming = ring.shift(kv) if step + 1 < ring.size else None
            rows, cols, causal = block_at(step, ring, half)
            k_held, v_held = _unpack(kv, k.shape, v.shape)
            q_rows, k_cols, v_cols = (t[:, :, sl].contiguous() for t, sl in ((q, rows), (k_held, cols), (v_held, cols)))
            kernel = kernel_for(q_rows, k_cols, v_cols, causal)
            block_out, block_lse, aux = kernel.forward(q_rows, k_cols, v_cols, causal, scale)
            kernels.append((kernel, aux))
            if out is None:
                out, lse = block_out.to(_accumulation_dtype(q)), block_lse.contiguous()
            else:
                _merge(out, lse, rows, block_out, block_lse)
            if incoming is not None:
                kv = incoming.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.kernels, ctx.scale = ring, kernels, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        q, k, v, out, lse = ctx.saved_tensors
        ring = ctx.ring
        half, dout = q.shape[2] // 2, grad_out.contiguous()
        acc = _accumulation_dtype(q)
        dq = torch.zeros_like(q, dtype=acc)
        kv, pending_grad = _pack(k, v), None
        for step in range(ring.size):
            incoming = ring.shift(kv) if step + 1 < ring.size else None
            rows, cols, causal = block_at(step, ring, half)
            part = [t[:, :, rows].contiguous() for t in (dout, q, out, lse)]
            k_cols, v_cols = (t[:, :, cols].contiguous() for t in _unpack(kv, k.shape, v.shape))
            kernel, aux = ctx.kernels[step]
            dq_b, dk_b, dv_b = kernel.backward(part[0], part[1], k_cols, v_cols, part[2], part[3], aux, causal,
                                               ctx.scale)
            dq[:, :, rows] += dq_b
            # the K/V gradient accumulated by the ranks this block visited before, then ours, then onwards
            dkv = _packed_zeros(k, v, acc) if step == 0 else pending_grad.wait()
            dk, dv = _unpack(dkv, k.shape, v.shape)
            dk[:, :, cols] += dk_b
            dv[:, :, cols] += dv_b
            pending_grad = ring.shift(dkv)
            if incoming is not None:
                kv = incoming.wait()
        dk, dv = _unpack(pending_grad.wait(), k.shape, v.shape)  # our own K/V's gradient, home after a full circle
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


@torch.compiler.disable  # point-to-point exchanges inside: torch.compile runs the layer around it
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Group, cp: int,
                   cp_rank: int, kernel_for: KernelFor, scale: float | None = None) -> torch.Tensor:
    """Causal attention of this rank's two query chunks over the whole sequence, K/V passed around the ring.

    q: [b, nq, S/cp, d] (local chunks); k: [b, ng, S/cp, d], v: [b, ng, S/cp, dv] (local) -> [b, nq, S/cp, dv];
    `kernel_for`: picks each block's kernel pair (KernelFor); `scale`: of q k^T (default 1/sqrt(d), as SDPA).

    A v narrower than q/k (MLA's: 128 against q's 192 in DeepSeek-V3) travels as it is; a block kernel that takes
    one head size only pads it per block (bridge.nn.attention.with_v_padded). A v wider than q/k (no model has one)
    gets q and k zero-padded to its width here: zero columns change no score.
    """
    d, dv = q.shape[-1], v.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    if dv > d:
        q, k = (F.pad(t, (0, dv - d)) for t in (q, k))
    q, k, v = (t.contiguous() for t in (q, k, v))
    return _RingAttention.apply(q, k, v, Ring(group, cp, cp_rank), scale, kernel_for)
