"""Training pipeline schedules: no pipelining, 1F1B and interleaved 1F1B (Megatron Core's, on torch.distributed).

A schedule runs the forward and backward passes of a step's micro-batches on this rank's model
chunks and moves activations / their gradients between stages. It is told nothing about losses or
optimizers: `forward_step(chunk, input, m)` returns the chunk's output (on the model's last chunk a
scalar loss to backpropagate), and `on_last_backward(chunk)` is called right before the last
backward pass of each chunk, so data-parallel gradient reduction can start under it.

Communication uses batched isend/irecv. Messages between two ranks are posted in the same order on
both sides (forward-direction first, then backward-direction, and tags 0/1 for the two kinds where
the backend honours tags), which keeps PP=2 with virtual chunks - where both directions connect the
same pair of ranks - correctly matched.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from bridge.parallel.state import ParallelState

ForwardStep = Callable[[int, torch.Tensor | None, int], torch.Tensor]
OnLastBackward = Callable[[int], None]


class _P2P:
    """Exchanges of [s(/tp), b, h] tensors with the previous and next pipeline stage."""

    def __init__(self, ps: ParallelState, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.ps, self.shape, self.dtype, self.device = ps, shape, dtype, device

    def exchange(self, *, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
                 recv_prev: bool = False, recv_next: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> (tensor from the previous stage, tensor from the next stage)."""
        ps, ops = self.ps, []
        from_prev = torch.empty(self.shape, dtype=self.dtype, device=self.device) if recv_prev else None
        from_next = torch.empty(self.shape, dtype=self.dtype, device=self.device) if recv_next else None
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, send_next.contiguous(), ps.next_rank, ps.pp_group, tag=0))
        if from_prev is not None:
            ops.append(dist.P2POp(dist.irecv, from_prev, ps.prev_rank, ps.pp_group, tag=0))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), ps.prev_rank, ps.pp_group, tag=1))
        if from_next is not None:
            ops.append(dist.P2POp(dist.irecv, from_next, ps.next_rank, ps.pp_group, tag=1))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        if from_prev is not None:
            from_prev.requires_grad_(True)
        return from_prev, from_next


def _backward(x: torch.Tensor | None, y: torch.Tensor, grad_y: torch.Tensor | None) -> torch.Tensor | None:
    """Backpropagate from `y` (a loss when grad_y is None); return the gradient of the chunk's input."""
    torch.autograd.backward(y, grad_tensors=grad_y)
    return None if x is None else x.grad


def no_pipelining(chunks: Sequence[nn.Module], num_microbatches: int, forward_step: ForwardStep,
                  on_last_backward: OnLastBackward) -> None:
    """PP = 1: forward and backward each micro-batch in turn (gradient accumulation)."""
    for m in range(num_microbatches):
        loss = forward_step(0, None, m)
        if m == num_microbatches - 1:
            on_last_backward(0)
        _backward(None, loss, None)


def one_f_one_b(ps: ParallelState, p2p: _P2P, num_microbatches: int, forward_step: ForwardStep,
                on_last_backward: OnLastBackward) -> None:
    """Megatron's non-interleaved schedule: warmup forwards, steady one-forward-one-backward, cooldown."""
    first, last = ps.is_first_stage, ps.is_last_stage
    warmup = min(ps.pp - ps.pp_rank - 1, num_microbatches)
    remaining = num_microbatches - warmup
    inputs: list[torch.Tensor | None] = []
    outputs: list[torch.Tensor] = []

    def forward(m: int, x: torch.Tensor | None) -> torch.Tensor:
        y = forward_step(0, x, m)
        inputs.append(x)
        outputs.append(y)
        return y

    def backward(grad_y: torch.Tensor | None, is_last: bool) -> torch.Tensor | None:
        if is_last:
            on_last_backward(0)
        return _backward(inputs.pop(0), outputs.pop(0), grad_y)

    for m in range(warmup):
        x, _ = p2p.exchange(recv_prev=not first)
        y = forward(m, x)
        p2p.exchange(send_next=None if last else y.detach())
    x = p2p.exchange(recv_prev=not first)[0] if remaining else None
    for i in range(remaining):
        y = forward(warmup + i, x)
        _, grad_y = p2p.exchange(send_next=None if last else y.detach(), recv_next=not last)
        grad_x = backward(grad_y, is_last=warmup == 0 and i == remaining - 1)
        if i == remaining - 1:
            x = None
            p2p.exchange(send_prev=None if first else grad_x)
        else:
            x, _ = p2p.exchange(send_prev=None if first else grad_x, recv_prev=not first)
    for i in range(warmup):
        _, grad_y = p2p.exchange(recv_next=not last)
        grad_x = backward(grad_y, is_last=i == warmup - 1)
        p2p.exchange(send_prev=None if first else grad_x)


def interleaved(ps: ParallelState, p2p: _P2P, num_chunks: int, num_microbatches: int, forward_step: ForwardStep,
                on_last_backward: OnLastBackward) -> None:
    """Megatron's interleaved 1F1B for `num_chunks` virtual chunks per stage (micro-batches a multiple of PP)."""
    pp, rank = ps.pp, ps.pp_rank
    total = num_microbatches * num_chunks
    if num_microbatches == pp:
        warmup = total
    else:
        warmup = min((pp - rank - 1) * 2 + (num_chunks - 1) * pp, total)
    remaining = total - warmup
    inputs: list[list[torch.Tensor | None]] = [[] for _ in range(num_chunks)]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(num_chunks)]
    grads: list[list[torch.Tensor | None]] = [[] for _ in range(num_chunks)]

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (pp * num_chunks)) // pp
        return c if forward else num_chunks - c - 1

    def microbatch_of(k: int) -> int:
        return (k // (pp * num_chunks)) * pp + k % pp

    def first_stage(c: int) -> bool:
        return rank == 0 and c == 0

    def last_stage(c: int) -> bool:
        return rank == pp - 1 and c == num_chunks - 1

    def forward(k: int) -> torch.Tensor:
        c = chunk_of(k, True)
        if first_stage(c) and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)
        y = forward_step(c, inputs[c][-1], microbatch_of(k))
        outputs[c].append(y)
        return y

    def backward(k: int) -> torch.Tensor | None:
        c = chunk_of(k, False)
        if last_stage(c) and not grads[c]:
            grads[c].append(None)
        if microbatch_of(k) == num_microbatches - 1:
            on_last_backward(c)
        return _backward(inputs[c].pop(0), outputs[c].pop(0), grads[c].pop(0))

    inputs[0].append(p2p.exchange(recv_prev=rank != 0)[0])
    for k in range(warmup):
        y = forward(k)
        nxt = chunk_of(k + 1, True)
        recv_prev = not (rank == 0 and nxt == 0) and k != total - 1
        send = None if last_stage(chunk_of(k, True)) else y.detach()
        if k == warmup - 1 and warmup != total:
            x, grad_y = p2p.exchange(send_next=send, recv_prev=recv_prev, recv_next=rank != pp - 1)
            grads[num_chunks - 1].append(grad_y)
        else:
            x, _ = p2p.exchange(send_next=send, recv_prev=recv_prev)
        if recv_prev:
            inputs[nxt].append(x)
    for i in range(remaining):
        fk, bk = i + warmup, i
        y = forward(fk)
        grad_x = backward(bk)
        send = None if last_stage(chunk_of(fk, True)) else y.detach()
        send_back = None if first_stage(chunk_of(bk, False)) else grad_x
        recv_prev, recv_next = True, True
        if rank == 0:
            nxt = chunk_of(fk - (pp - 1), True)
            recv_prev = nxt != num_chunks - 1
            nxt += 1
        else:
            nxt = chunk_of(fk + 1, True)
        if rank == pp - 1:
            nxt_b = chunk_of(bk - (pp - 1), False)
            recv_next = nxt_b != 0
            nxt_b -= 1
        else:
            nxt_b = chunk_of(bk + 1, False)
        if i == remaining - 1:
            recv_prev = False
        x, grad_y = p2p.exchange(send_next=send, send_prev=send_back, recv_prev=recv_prev, recv_next=recv_next)
        if recv_prev:
            inputs[nxt].append(x)
        if recv_next:
            grads[nxt_b].append(grad_y)
    if warmup == total:
        grads[num_chunks - 1].append(p2p.exchange(recv_next=rank != pp - 1)[1])
    for k in range(remaining, total):
        grad_x = backward(k)
        nxt_b = chunk_of(k + 1, False)
        recv_next = not (rank == pp - 1 and nxt_b == num_chunks - 1) and k != total - 1
        send_back = None if first_stage(chunk_of(k, False)) else grad_x
        _, grad_y = p2p.exchange(send_prev=send_back, recv_next=recv_next)
        if recv_next:
            grads[nxt_b].append(grad_y)


def forward_backward(chunks: Sequence[nn.Module], ps: ParallelState, num_microbatches: int, forward_step: ForwardStep,
                     on_last_backward: OnLastBackward, *, activation_shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device) -> None:
    """Pick the schedule for the layout: no pipelining, 1F1B, or interleaved with virtual chunks."""
    if ps.pp == 1:
        return no_pipelining(chunks, num_microbatches, forward_step, on_last_backward)
    p2p = _P2P(ps, activation_shape, dtype, device)
    if len(chunks) == 1:
        return one_f_one_b(ps, p2p, num_microbatches, forward_step, on_last_backward)
    return interleaved(ps, p2p, len(chunks), num_microbatches, forward_step, on_last_backward)
