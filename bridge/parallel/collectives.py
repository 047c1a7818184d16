"""Autograd-aware tensor/sequence-parallel collectives (Megatron's mappings.py, on torch.distributed).

Each op is the identity when its group is None or has one rank, so single-process models run the
same code. The last dimension is the TP dimension of activations; dimension 0 is the sequence
dimension (Megatron's [s, b, h] layout) for the sequence-parallel ops.

The synchronous ops, which run inside torch.compile'd layers, are PyTorch's functional collectives
(out-of-place, traced by torch.compile, on NCCL and gloo alike). The in-place c10d calls they replace
(`dist.all_reduce(x)`, `dist.all_to_all_single(out, x)`), and a view returned by `split`, compiled to zero
gradients in torch 2.11 where they sat inside an autograd.Function: compiled TP, sequence-parallel, EP and
a2a context-parallel layers lost most of their backward, silently. tests/test_parallel_collectives.py checks
every op compiled against eager, and tests/test_gpu.py whole layouts on GPUs. The asynchronous ops (DP gradient
buckets, the column-parallel backward's overlap) stay c10d: they run outside compiled graphs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# torch 2.13 renamed these two (the old names warn that they are deprecated); older versions have only the old ones
_all_gather_single = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter_single = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor

Group = dist.ProcessGroup | None


def group_size(group: Group) -> int:
    """Ranks in `group`; 1 for None (no parallelism)."""
    return 1 if group is None else dist.get_world_size(group)


def _is_gloo(group: Group) -> bool:
    return dist.get_backend(group) == "gloo"


def all_reduce(x: torch.Tensor, group: Group, op: str = "sum") -> torch.Tensor:
    """A new tensor: `x` reduced over `group` by `op` ("sum", "max", ...); `x` is left as it is."""
    if group_size(group) == 1:
        return x
    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), op, group))


def all_gather(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in group-rank order."""
    if group_size(group) == 1:
        return x
    # funcol takes the dimension non-negative: -1 gave a wrong view for some shapes ([1, s, V] logits)
    return funcol.wait_tensor(_all_gather_single(x.contiguous(), dim % x.dim(), group))


def split(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """A copy of this rank's slice of `x` along `dim`: never a view, which torch 2.11 compiled to a zero gradient
    where an autograd.Function returned it."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {size}")
    return x.chunk(size, dim=dim)[dist.get_rank(group)].clone(memory_format=torch.contiguous_format)


def reduce_scatter(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum over ranks, then keep this rank's slice of dimension 0."""
    if group_size(group) == 1:
        return x
    return funcol.wait_tensor(_reduce_scatter_single(x.contiguous(), "sum", 0, group))


class Pending:
    """An asynchronous collective in flight; `wait()` returns its result (finishing gloo's emulations)."""

    def __init__(self, work: dist.Work | None, result: Any,
                 finish: Callable[[Any], torch.Tensor] | None = None) -> None:
        self.work, self.result, self.finish = work, result, finish

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.finish(self.result) if self.finish else self.result


def all_reduce_async(x: torch.Tensor, group: Group) -> Pending:
    """Start summing `x` (in place) over `group`."""
    if group_size(group) == 1:
        return Pending(None, x)
    x = x.contiguous()
    return Pending(dist.all_reduce(x, group=group, async_op=True), x)


def all_gather_async(x: torch.Tensor, group: Group) -> Pending:
    """Start concatenating every rank's `x` along dimension 0."""
    size = group_size(group)
    if size == 1:
        return Pending(None, x)
    x = x.contiguous()
    if _is_gloo(group):
        parts = [torch.empty_like(x) for _ in range(size)]
        return Pending(dist.all_gather(parts, x, group=group, async_op=True), parts, lambda p: torch.cat(p, 0))
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    return Pending(dist.all_gather_into_tensor(out, x, group=group, async_op=True), out)


def reduce_scatter_async(x: torch.Tensor, group: Group) -> Pending:
    """Start summing `x` over `group`, keeping this rank's slice of dimension 0."""
    size = group_size(group)
    if size == 1:
        return Pending(None, x)
    x = x.contiguous()
    if _is_gloo(group):  # no reduce-scatter in gloo: all-reduce a copy, then slice
        total = x.clone()
        return Pending(dist.all_reduce(total, group=group, async_op=True), total, lambda t: split(t, group, 0))
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    return Pending(dist.reduce_scatter_tensor(out, x, group=group, async_op=True), out)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:  # noqa: ANN001
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), out_splits, in_splits, group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        return _AllToAll.apply(grad.contiguous(), ctx.group, ctx.in_splits, ctx.out_splits), None, None, None


def all_to_all(x: torch.Tensor, group: Group, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    """Rows `x[sum(in_splits[:r]) : ...]` go to rank r; returns what every rank sent here, in rank order."""
    return _AllToAll.apply(x, group, out_splits, in_splits)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:  # noqa: ANN001
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return all_gather(x, group, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return split(grad, ctx.group, -1), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return split(x, group, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return all_gather(grad, ctx.group, dim=-1), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return split(x, group, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return all_gather(grad, ctx.group, dim=0), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, tp_output_grad: bool) -> torch.Tensor:  # noqa: ANN001
        ctx.group, ctx.tp_output_grad = group, tp_output_grad
        return all_gather(x, group, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        if ctx.tp_output_grad:  # the consumer is tensor-parallel: every rank holds a partial gradient
            return reduce_scatter(grad, ctx.group), None, None
        return split(grad, ctx.group, 0), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return all_gather(grad, ctx.group, dim=0), None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward identity, backward all-reduce: the input of a column-parallel linear."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward all-reduce, backward identity: the output of a row-parallel linear."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward all-gather of the last dimension, backward split."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward split of the last dimension, backward all-gather."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward split of the sequence dimension (0), backward all-gather."""
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group: Group, tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """Forward all-gather of the sequence dimension; backward reduce-scatter (or split when the consumer
    is not tensor-parallel, e.g. gathering outputs for a loss)."""
    return x if group_size(group) == 1 else _GatherFromSP.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward reduce-scatter along the sequence dimension, backward all-gather: row-parallel output with SP."""
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group)
