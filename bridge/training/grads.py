"""Contiguous parameter and gradient buffers with bucketed data-parallel reduction overlapped with backward.

Every parameter of a rank's model chunks becomes a view into one flat parameter buffer, and its
gradient (`param.main_grad`) a view into one flat gradient buffer (fp32 with
`--accumulate-allreduce-grads-in-fp32`). Buckets are contiguous ranges filled in reverse parameter
order, roughly the order backward produces gradients; when the last micro-batch's backward has
filled a bucket, its all-reduce (or, for the distributed optimizer, reduce-scatter) starts at once.

Two kinds of gradients are not complete after a rank's own backward and wait in a deferred bucket
per chunk: replicated weights that see only part of the data on each TP rank (norms under sequence
parallelism, q/k norms, which see only this rank's heads) are summed over TP, and the tied
embedding / output-layer copies are summed over the first and last stage. Both sums are linear, so
doing them before the DP sum gives the same result and keeps the sharded (ZeRO-1) case simple.

Expert weights (marked `allreduce = False`, as Megatron does) live in buckets of their own, reduced
(and, with the distributed optimizer, sharded) over the expert-data-parallel group: the ranks holding
the same experts. Their gradients already hold every token of the EP group (the all-to-all's backward
brings them home), so summing over expert-DP completes them as the DP sum completes dense ones.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from bridge.nn.gpt import tp_partial, tp_replicated
from bridge.parallel.state import ParallelState

log = logging.getLogger(__name__)

@dataclass
class Entry:
    """One parameter's place in the flat buffers."""

    chunk: int
    name: str
    param: nn.Parameter
    start: int
    numel: int
    tp_duplicate: bool
    """A copy that another rank's grad-norm already counts (TP-replicated off TP rank 0, tied head copy)."""
    no_decay: bool
    sum_over: str | None = None
    """"tp" or "embedding": the group this gradient is summed over before the DP reduction."""
    expert: bool = False
    """An expert weight: reduced over the expert-data-parallel group instead of DP."""


@dataclass
class Bucket:
    chunk: int
    start: int
    end: int
    entries: list[Entry] = field(default_factory=list)
    deferred: bool = False
    expert: bool = False
    ready: int = 0
    handle: dist.Work | None = None
    launched: bool = False


class ParamAndGradBuffer:
    """Flat buffers, buckets and the DP gradient synchronisation of one rank's model chunks."""

    def __init__(self, chunks: Sequence[nn.Module], ps: ParallelState, *, param_dtype: torch.dtype,
                 grad_dtype: torch.dtype, bucket_size: int, distributed: bool, sequence_parallel: bool,
                 gradient_accumulation_fusion: bool = False) -> None:
        # dense gradients are summed (and ZeRO-1 sharded) over DP x CP: CP ranks hold the same weights, other tokens
        self.ps, self.distributed, self.dp = ps, distributed, ps.dp_cp
        self.nccl = ps.dp_group is not None and dist.get_backend(ps.dp_group) == "nccl"
        self.entries: list[Entry] = []
        self.buckets: list[Bucket] = []
        self.sync_enabled = [False] * len(chunks)
        tied = {id(c.shared_embedding_or_output_weight()) for c in chunks
                if c.cfg.tie_word_embeddings and ps.pp > 1 and c.shared_embedding_or_output_weight() is not None}
        offset = 0
        for v, chunk in enumerate(chunks):
            regular, experts, deferred = [], [], []
            for name, p in reversed(list(chunk.named_parameters())):
                if not p.requires_grad:  # frozen (a LoRA base): no gradient, no buffer, no optimizer state
                    continue
                is_tied = id(p) in tied
                dup = (ps.tp_rank != 0 and tp_replicated(name)) or (is_tied and not ps.is_first_stage)
                sum_over = "embedding" if is_tied else "tp" if tp_partial(name, sequence_parallel, ps.tp) else None
                expert = not getattr(p, "allreduce", True)
                entry = Entry(v, name, p, 0, p.numel(), dup, p.ndim == 1, sum_over, expert)
                (deferred if sum_over else experts if expert else regular).append(entry)
            offset = self._fill(v, regular, offset, bucket_size, deferred=False)
            offset = self._fill(v, experts, offset, bucket_size, deferred=False, expert=True)
            offset = self._fill(v, deferred, offset, None, deferred=True)
        device = next(chunks[0].parameters()).device
        self.fp32_init = torch.zeros(offset, dtype=torch.float32, device=device)
        self.param_data = torch.zeros(offset, dtype=param_dtype, device=device)
        self.grad_data = torch.zeros(offset, dtype=grad_dtype, device=device)
        for e in self.entries:
            self.fp32_init[e.start:e.start + e.numel].copy_(e.param.data.reshape(-1))
            self.param_data[e.start:e.start + e.numel].copy_(e.param.data.reshape(-1))
            e.param.data = self.param_data[e.start:e.start + e.numel].view(e.param.shape)
            e.param.main_grad = self.grad_data[e.start:e.start + e.numel].view(e.param.shape)
        # Linear layers' weight-gradient GEMMs may add into main_grad themselves (bridge.nn.layers). They bypass the
        # post-accumulate hooks that start the DP buckets' reductions, so only where there is no DP reduction.
        self.fused = gradient_accumulation_fusion and self.dp == 1
        for e in self.entries:
            e.param.fuse_wgrad_accumulation = self.fused
        self.written: set[int] = set()
        """id() of the parameters whose main_grad already holds part of this step's gradient."""
        self.clear_grads()
        self._register_hooks()
        log.debug("grad buffer: %d parameters, %d buckets, %s grads", offset, len(self.buckets), grad_dtype)

    def _fill(self, chunk: int, entries: list[Entry], offset: int, bucket_size: int | None, *, deferred: bool,
              expert: bool = False) -> int:
        bucket: Bucket | None = None
        for e in entries:
            if bucket is None:
                bucket = Bucket(chunk, offset, offset, deferred=deferred, expert=expert)
            e.start = offset
            offset += e.numel
            bucket.entries.append(e)
            self.entries.append(e)
            if bucket_size is not None and offset - bucket.start >= bucket_size:
                offset = self._close(bucket, offset)
                bucket = None
        return self._close(bucket, offset) if bucket is not None else offset

    def _close(self, bucket: Bucket, offset: int) -> int:
        """Pad the bucket to a multiple of DP * 64 elements, so DP shards are equal and aligned."""
        multiple = self.dp * 64
        bucket.end = -(-offset // multiple) * multiple
        self.buckets.append(bucket)
        return bucket.end

    def _register_hooks(self) -> None:
        for bucket in self.buckets:
            for e in bucket.entries:
                e.param.register_post_accumulate_grad_hook(self._hook(bucket))

    def _hook(self, bucket: Bucket):  # noqa: ANN202
        def hook(p: nn.Parameter) -> None:
            if p.grad is not None and p.grad.data_ptr() != p.main_grad.data_ptr():
                # a fresh or lower-precision grad: the step's first one is copied (the buffer is not zeroed between
                # steps), later ones added; then autograd accumulates straight into the buffer where dtypes match
                (p.main_grad.add_ if id(p) in self.written else p.main_grad.copy_)(p.grad)
                p.grad = p.main_grad if p.main_grad.dtype == p.dtype else None
            self.written.add(id(p))
            bucket.ready += 1
            if bucket.ready == len(bucket.entries):
                bucket.ready = 0
                if self.sync_enabled[bucket.chunk] and not bucket.deferred:
                    self._launch(bucket)
        return hook

    # ---- synchronisation ---------------------------------------------------------------------
    def group(self, bucket: Bucket) -> tuple[dist.ProcessGroup | None, int, int]:
        """(group, size, this rank's index) the bucket is reduced and sharded over: DP, or expert-DP for experts."""
        if bucket.expert:
            return self.ps.expert_dp_group, self.ps.expert_dp, self.ps.expert_dp_rank
        return self.ps.dp_cp_group, self.dp, self.ps.dp_cp_rank

    def shard(self, bucket: Bucket) -> tuple[int, int]:
        """This rank's range of a bucket (the whole bucket without the distributed optimizer)."""
        if not self.distributed:
            return bucket.start, bucket.end
        _, n, rank = self.group(bucket)
        size = (bucket.end - bucket.start) // n
        lo = bucket.start + rank * size
        return lo, lo + size

    def _launch(self, bucket: Bucket) -> None:
        bucket.launched = True
        group, n, _ = self.group(bucket)
        if n == 1:
            return
        data = self.grad_data[bucket.start:bucket.end]
        if self.distributed and self.nccl:
            lo, hi = self.shard(bucket)
            bucket.handle = dist.reduce_scatter_tensor(self.grad_data[lo:hi], data, group=group, async_op=True)
        else:  # gloo has no reduce-scatter: the all-reduce leaves the shard (and more) summed
            bucket.handle = dist.all_reduce(data, group=group, async_op=True)

    def enable_sync(self, chunk: int) -> None:
        """Called by the schedule before the last micro-batch's backward of `chunk`."""
        self.sync_enabled[chunk] = True

    def finish(self) -> None:
        """Complete the deferred sums and every bucket's DP reduction; wait for all of them."""
        for e in self.entries:
            if id(e.param) not in self.written:  # no gradient this step (e.g. an expert no token chose)
                e.param.main_grad.zero_()
        for bucket in self.buckets:
            if bucket.deferred:
                self._deferred_sums(bucket)
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            bucket.handle, bucket.launched, bucket.ready = None, False, 0
        self.sync_enabled = [False] * len(self.sync_enabled)

    def _deferred_sums(self, bucket: Bucket) -> None:
        groups = {"tp": self.ps.tp_group, "embedding": self.ps.embedding_group}
        for e in bucket.entries:
            group = groups[e.sum_over]
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(e.param.main_grad, group=group)

    def clear_grads(self) -> None:
        """Start a step with zero gradients. Without fused GEMMs the buffer is not written: each weight's first
        gradient of the step is copied into it and finish() zeroes the weights that got none (one pass less over
        the buffer). The fused GEMMs add into the buffer, which is then zeroed."""
        self.written.clear()
        if self.fused:
            self.grad_data.zero_()
            self.written.update(id(e.param) for e in self.entries)
        for e in self.entries:
            e.param.grad = None

    def gather_params(self) -> None:
        """After a sharded optimizer step: every DP rank gets the updated parameters of all shards."""
        if not self.distributed or self.dp == 1:
            return
        for bucket in self.buckets:
            group, n, _ = self.group(bucket)
            if n == 1:
                continue
            data = self.param_data[bucket.start:bucket.end]
            lo, hi = self.shard(bucket)
            if self.nccl:
                dist.all_gather_into_tensor(data, self.param_data[lo:hi], group=group)
            else:
                dist.all_gather(list(data.chunk(n)), self.param_data[lo:hi].clone(), group=group)

