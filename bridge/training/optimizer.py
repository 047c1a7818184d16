"""AdamW on fp32 master weights, optionally sharded over data-parallel ranks (ZeRO-1, distributed optimizer).

The model keeps its parameters in the training dtype (bf16 or fp32) inside `ParamAndGradBuffer`;
the optimizer owns fp32 master copies of the ranges of that buffer it is responsible for: all of
it, or with `--use-distributed-optimizer` this DP rank's 1/DP of every bucket, so master weights
and Adam moments cost 12/DP bytes per parameter.

A step is two passes over the owned ranges, with no host synchronisation:
1. the global gradient norm, read straight from the (bf16) gradient buffer and summed over ranks
   on the device; the clipping factor and "is the norm finite" stay device tensors;
2. one elementwise update per contiguous range (`adamw_update`): it reads the gradient, the master
   weight and both moments once, applies clipping, weight decay and Adam, and writes the moments,
   the master and the parameter's bf16 copy. On CUDA it is one torch.compile'd kernel.
A non-finite norm leaves weights, moments and the step count unchanged (the update is masked on
the device, so the host never waits for the norm). Compared with torch's fused AdamW preceded by
an fp32 copy of the gradients, a clipping pass and a copy back into the parameters, this moves
about half the bytes (29 instead of ~52 per parameter with bf16 gradients).

With `--use-precision-aware-optimizer` (Megatron-LM's flag; its optimizer then stores "param remainders" too) a bf16
model keeps no separate fp32 masters: an fp32 master's upper 16 bits, rounded, are the bf16 parameter itself, and
only the lower 16 bits are kept beside it (`split_master` / `join_master`). The master is the same fp32 number, bit
for bit, in 2 bytes per parameter instead of 4; the parameter is the master rounded to nearest as before, ties
(one value in 65,536) going away from zero instead of to even.

Checkpoints take the state piece by piece (`pieces`, `header`; bridge/training/legacy_save.py and
dist_save.py) and never as whole-model buffers; `restore` refills the pieces from any layout's state.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from bridge.errors import BridgeError
from bridge.fused import fused
from bridge.parallel.state import ParallelState
from bridge.training.grads import Entry, ParamAndGradBuffer

log = logging.getLogger(__name__)


def split_master(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (bf16 rounded to nearest, ties away from zero; int16 remainder) with join_master(*result) == master
    bit for bit: the fp32 bit pattern is the bf16 one times 2^16 plus the remainder, which lies in [-2^15, 2^15)."""
    bits = master.view(torch.int32)
    high = (bits + 0x8000) >> 16
    return high.to(torch.int16).view(torch.bfloat16), (bits - (high << 16)).to(torch.int16)


def join_master(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The fp32 master that split_master gave `param` (bf16) and `remainder` (int16) for."""
    return ((param.view(torch.int16).to(torch.int32) << 16) + remainder.to(torch.int32)).view(torch.float32)


@dataclass
class Span:
    """A contiguous range [lo, hi) of the flat buffers that this rank updates, with its fp32 optimizer state."""

    lo: int
    hi: int
    master: torch.Tensor
    """fp32 master weights, or with `remainders` their int16 lower halves (the upper ones are `param`)."""
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    decay: torch.Tensor
    """bool per element: weight decay applies (matrices yes; norms, biases and bucket padding no)."""
    param: torch.Tensor
    """The parameters of [lo, hi): a view of the model's flat buffer."""
    remainders: bool = False

    def state(self, name: str, a: int, b: int) -> torch.Tensor:
        """fp32 `master`, `exp_avg` or `exp_avg_sq` of [lo + a, lo + b): a view, or a master rebuilt from remainders."""
        if name == "master" and self.remainders:
            return join_master(self.param[a:b], self.master[a:b])
        return getattr(self, name)[a:b]

    def set_state(self, name: str, a: int, b: int, value: torch.Tensor) -> None:
        """Write fp32 `value` (which may be the state's own view) as state `name` of [lo + a, lo + b); a master also
        sets the parameters."""
        if name == "master" and self.remainders:
            param, remainder = split_master(value.contiguous())
            self.param[a:b].copy_(param)
            self.master[a:b].copy_(remainder)
            return
        view = getattr(self, name)[a:b]
        if value.data_ptr() != view.data_ptr():
            view.copy_(value)
        if name == "master":
            self.param[a:b].copy_(value)


@dataclass
class Piece:
    """One parameter's part [lo, hi) of a span: the names the checkpoint uses for the span's state."""

    entry: Entry
    lo: int
    hi: int
    span: Span

    def state(self, name: str) -> torch.Tensor:
        """fp32 `master`, `exp_avg` or `exp_avg_sq` of this piece (see Span.state)."""
        return self.span.state(name, self.lo - self.span.lo, self.hi - self.span.lo)


@dataclass(frozen=True, kw_only=True)
class AdamConfig:
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    clip_grad: float
    param_remainders: bool = False
    """bf16 parameters: keep the fp32 masters as 16-bit remainders beside them (--use-precision-aware-optimizer)."""


STATE_NAMES = ("master", "exp_avg", "exp_avg_sq")


def state_key(chunks: int, entry: Entry) -> str:
    """`model.<name>` or `model<v>.<name>`: the name of the weight in the checkpoint."""
    return f"model.{entry.name}" if chunks == 1 else f"model{entry.chunk}.{entry.name}"


def _adamw(master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
           decay: torch.Tensor, scalars: torch.Tensor, beta1: float, beta2: float, eps: float,
           weight_decay: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(master, exp_avg, exp_avg_sq) after one AdamW step (torch.optim.AdamW's formula, decoupled weight decay).

    `scalars` (fp32 device tensor): lr, 1 - beta1^t, sqrt(1 - beta2^t), gradient scale (clipping), apply (1/0).
    """
    lr, correction1, correction2_sqrt, scale, apply = scalars.unbind()
    g = grad.float() * scale
    m = exp_avg + (g - exp_avg) * (1 - beta1)
    v = exp_avg_sq * beta2 + g * g * (1 - beta2)
    w = master * torch.where(decay, 1 - lr * weight_decay, 1.0)
    w = w - (lr / correction1) * m / (v.sqrt() / correction2_sqrt + eps)
    keep = apply == 0
    return torch.where(keep, master, w), torch.where(keep, exp_avg, m), torch.where(keep, exp_avg_sq, v)


def adamw_update(master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
                 decay: torch.Tensor, param: torch.Tensor, scalars: torch.Tensor, beta1: float, beta2: float,
                 eps: float, weight_decay: float) -> None:
    """One AdamW step of a flat range, in place: masters, moments and the parameters' copy."""
    w, m, v = _adamw(master, exp_avg, exp_avg_sq, grad, decay, scalars, beta1, beta2, eps, weight_decay)
    master.copy_(w)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    param.copy_(w)


def adamw_update_remainders(remainder: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                            grad: torch.Tensor, decay: torch.Tensor, param: torch.Tensor, scalars: torch.Tensor,
                            beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """adamw_update for masters kept as bf16 parameters + int16 remainders: joined, stepped, split again."""
    w, m, v = _adamw(join_master(param, remainder), exp_avg, exp_avg_sq, grad, decay, scalars, beta1, beta2, eps,
                     weight_decay)
    high, low = split_master(w)
    remainder.copy_(low)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    param.copy_(high)


class MixedPrecisionAdamW:
    """AdamW over this rank's ranges of the flat buffers, with global-norm clipping."""

    def __init__(self, buffer: ParamAndGradBuffer, ps: ParallelState, cfg: AdamConfig) -> None:
        self.buffer, self.ps, self.cfg = buffer, ps, cfg
        self.chunks = len(buffer.sync_enabled)
        self.device = buffer.param_data.device
        self.remainders = cfg.param_remainders
        if self.remainders and buffer.param_data.dtype != torch.bfloat16:
            raise BridgeError("internal: master-weight remainders need bf16 parameters (the plan checks --bf16)")
        self.spans = self._spans(self._owned_ranges())
        self.pieces: list[Piece] = []
        for span in self.spans:
            for e in buffer.entries:
                a, b = max(span.lo, e.start), min(span.hi, e.start + e.numel)
                if a < b:
                    self.pieces.append(Piece(e, a, b, span))
                    span.decay[a - span.lo:b - span.lo] = not e.no_decay
        self.step_count = torch.zeros((), dtype=torch.float32, device=self.device)
        update = adamw_update_remainders if self.remainders else adamw_update
        self._update = fused(update, self.device, dynamic=True, in_place=True)
        # the gradient views the norm reads, per kind [dense, expert], each distinct weight once: built once (the
        # buffer is never reallocated), not on every step
        self._norm_views = [[buffer.grad_data[p.lo:p.hi] for p in self.pieces
                             if not p.entry.tp_duplicate and int(p.entry.expert) == kind] for kind in (0, 1)]

    def _owned_ranges(self) -> list[tuple[int, int]]:
        """This rank's shard of every bucket, adjacent ones merged (without sharding: the whole buffer)."""
        ranges: list[tuple[int, int]] = []
        for bucket in self.buffer.buckets:
            lo, hi = self.buffer.shard(bucket)
            if ranges and ranges[-1][1] == lo:
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))
        return ranges

    def _spans(self, ranges: list[tuple[int, int]]) -> list[Span]:
        """The state of each owned range. Why in this order: the buffer's fp32 copy of the weights is as large as all
        the masters together (without sharding, it is them), so it is taken or copied first and freed before the
        moments are allocated: the fp32 copy, masters and moments never coexist (2.8B parameters: 10.4 GiB less)."""
        init, params = self.buffer.fp32_init, self.buffer.param_data
        if self.remainders:  # the parameters become the masters' rounded upper halves, the remainders the rest
            block = 1 << 24  # every rank rounds every parameter so (also those other DP ranks own): replicas agree
            for lo in range(0, init.numel(), block):
                params[lo:lo + block].copy_(split_master(init[lo:lo + block])[0])
            masters = [split_master(init[lo:hi])[1] for lo, hi in ranges]
        else:
            masters = [init if (lo, hi) == (0, init.numel()) else init[lo:hi].clone() for lo, hi in ranges]
        self.buffer.fp32_init = init = None
        zeros = lambda n, dtype=torch.float32: torch.zeros(n, dtype=dtype, device=self.device)  # noqa: E731
        return [Span(lo, hi, master, zeros(hi - lo), zeros(hi - lo), zeros(hi - lo, torch.bool), params[lo:hi],
                     self.remainders) for (lo, hi), master in zip(ranges, masters)]

    # ---- one step --------------------------------------------------------------------------
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm (a device tensor) over every distinct weight of the model (each element counted once).

        Without sharding every replica counts its gradients: dense ones DP times, expert ones
        expert-DP times (EP ranks hold different experts), so the two sums are divided separately.
        """
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # [dense, expert]
        for kind, views in enumerate(self._norm_views):  # one fused multi-tensor kernel per kind; squares add in fp64
            if views:
                totals[kind] = torch.stack(torch._foreach_norm(views, 2, dtype=torch.float32)).double().pow(2).sum()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
            if not self.buffer.distributed:
                totals[0] /= self.ps.dp_cp  # scalars, not a tensor built from a list: no host-to-device copy
                totals[1] /= self.ps.expert_dp
        return totals.sum().sqrt()

    def step(self, lr: float) -> torch.Tensor:
        """Clip, update and write back; returns the gradient norm before clipping (a device tensor: reading it
        waits for the step). A non-finite norm skips the update."""
        norm = self.grad_norm().float()
        finite = torch.isfinite(norm)
        scale = torch.ones_like(norm)
        if self.cfg.clip_grad > 0:
            scale = torch.where(finite, (self.cfg.clip_grad / (norm + 1e-6)).clamp(max=1.0), scale)
        self.step_count += finite.float()
        scalars = torch.stack([torch.full_like(norm, lr), 1 - self.cfg.beta1 ** self.step_count,
                               (1 - self.cfg.beta2 ** self.step_count).sqrt(), scale, finite.float()])
        for span in self.spans:
            self._update(span.master, span.exp_avg, span.exp_avg_sq, self.buffer.grad_data[span.lo:span.hi],
                         span.decay, self.buffer.param_data[span.lo:span.hi], scalars,
                         self.cfg.beta1, self.cfg.beta2, self.cfg.eps, self.cfg.weight_decay)
        self.buffer.gather_params()
        return norm

    # ---- checkpoint state --------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        """The optimizer's non-tensor state: what a checkpoint stores besides each piece's tensors."""
        return {"kind": "bridge.MixedPrecisionAdamW", "step": int(self.step_count.item()),
                "hyper": {"betas": [self.cfg.beta1, self.cfg.beta2], "eps": self.cfg.eps,
                          "weight_decay": self.cfg.weight_decay}}

    def restore(self, fill: Callable[[Piece, str, torch.Tensor], None], step: int) -> None:
        """Refill every piece's state (`fill(piece, state name, view to write)`); the parameters take the masters."""
        with torch.no_grad():
            for p in self.pieces:
                a, b = p.lo - p.span.lo, p.hi - p.span.lo
                for n in STATE_NAMES:
                    value = p.state(n)  # a view of the state, or a master rebuilt from remainders, to overwrite
                    fill(p, n, value)
                    if n == "master":  # the parameters (and remainders) follow from it
                        p.span.set_state(n, a, b, value)
            self.step_count.fill_(float(step))
        self.buffer.gather_params()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from whole tensors per weight name (legacy checkpoints: `params`, any DP size)."""
        params = state["params"]
        missing = sorted({state_key(self.chunks, p.entry) for p in self.pieces} - set(params))
        if missing:
            raise BridgeError(f"the checkpoint's optimizer state lacks {missing[:4]}; was it saved for another layout?")

        def fill(p: Piece, n: str, out: torch.Tensor) -> None:
            a, b = p.lo - p.entry.start, p.hi - p.entry.start
            out.copy_(params[state_key(self.chunks, p.entry)][n].reshape(-1)[a:b])

        self.restore(fill, state["step"])
