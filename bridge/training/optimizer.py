"""AdamW on fp32 master weights, optionally sharded over data-parallel ranks (ZeRO-1, distributed optimizer).

The model keeps its parameters in the training dtype (bf16 or fp32) inside `ParamAndGradBuffer`;
the optimizer owns fp32 master copies of the pieces of that buffer it is responsible for: all of
them, or with `--use-distributed-optimizer` this DP rank's 1/DP of every bucket, so master weights
and Adam moments cost 12/DP bytes per parameter. A step: gradients of the owned pieces (fp32) ->
global norm and clipping -> AdamW (fused where available) -> cast back into the parameter buffer ->
all-gather of the updated shards.

The checkpointed state is keyed by parameter name and holds whole tensors (gathered over DP), so it
does not depend on DP, on the bucket layout or on whether the optimizer was sharded.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from bridge.parallel.state import ParallelState
from bridge.training.grads import Entry, ParamAndGradBuffer

log = logging.getLogger(__name__)


@dataclass
class Piece:
    """The part [lo, hi) of the flat buffers, inside one parameter, that this rank's optimizer updates."""

    entry: Entry
    lo: int
    hi: int
    master: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class AdamConfig:
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    clip_grad: float


def state_key(chunks: int, entry: Entry) -> str:
    """`model.<name>` or `model<v>.<name>`: the name of the weight in the checkpoint."""
    return f"model.{entry.name}" if chunks == 1 else f"model{entry.chunk}.{entry.name}"


class MixedPrecisionAdamW:
    """AdamW over this rank's pieces of the flat buffers, with global-norm clipping."""

    def __init__(self, buffer: ParamAndGradBuffer, ps: ParallelState, cfg: AdamConfig) -> None:
        self.buffer, self.ps, self.cfg = buffer, ps, cfg
        self.chunks = len(buffer.sync_enabled)
        self.pieces: list[Piece] = []
        for bucket in buffer.buckets:
            lo, hi = buffer.shard(bucket)
            for e in bucket.entries:
                a, b = max(lo, e.start), min(hi, e.start + e.numel)
                if a < b:
                    self.pieces.append(Piece(e, a, b, buffer.fp32_init[a:b].clone()))
        buffer.fp32_init = None  # the masters hold what they need; free the fp32 copy
        groups = [{"params": [p.master for p in self.pieces if not p.entry.no_decay], "weight_decay": cfg.weight_decay},
                  {"params": [p.master for p in self.pieces if p.entry.no_decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        try:
            self.adam = torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError) as exc:  # fused needs a supported device and dtype
            log.info("fused AdamW unavailable (%s); using the foreach implementation", exc)
            self.adam = torch.optim.AdamW(groups, foreach=True, **kwargs)

    # ---- one step --------------------------------------------------------------------------
    def _attach_grads(self) -> None:
        fp32 = self.buffer.grad_data.dtype == torch.float32
        for p in self.pieces:
            grad = self.buffer.grad_data[p.lo:p.hi]
            p.master.grad = grad if fp32 else grad.float()

    def grad_norm(self) -> float:
        """Global L2 norm over every distinct weight of the model (each element counted once).

        Without sharding every replica counts its gradients: dense ones DP times, expert ones
        expert-DP times (EP ranks hold different experts), so the two sums are divided separately.
        """
        device = self.buffer.grad_data.device
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # [dense, expert]
        for kind in (0, 1):  # one fused multi-tensor kernel per kind; the squares add up in fp64
            grads = [p.master.grad for p in self.pieces if not p.entry.tp_duplicate and int(p.entry.expert) == kind]
            if grads:
                totals[kind] = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
            if not self.buffer.distributed:
                totals = totals / torch.tensor([self.ps.dp_cp, self.ps.expert_dp], dtype=torch.float64, device=device)
        return math.sqrt(totals.sum().item())

    def step(self, lr: float) -> float:
        """Clip, update and write back; returns the gradient norm before clipping."""
        self._attach_grads()
        norm = self.grad_norm()
        if self.cfg.clip_grad > 0 and math.isfinite(norm):
            coef = self.cfg.clip_grad / (norm + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_([p.master.grad for p in self.pieces], coef)
        for group in self.adam.param_groups:
            group["lr"] = lr
        if math.isfinite(norm):
            self.adam.step()
        else:
            log.warning("gradient norm is %s; skipping this update", norm)
        torch._foreach_copy_([self.buffer.param_data[p.lo:p.hi] for p in self.pieces], [p.master for p in self.pieces])
        for p in self.pieces:
            p.master.grad = None
        self.buffer.gather_params()
        return norm

    # ---- checkpoint state --------------------------------------------------------------------
    def _step_count(self) -> int:
        for state in self.adam.state.values():
            return int(state["step"].item())
        return 0

    def state_dict(self) -> dict[str, Any] | None:
        """Whole fp32 master / exp_avg / exp_avg_sq per weight name, gathered to the ranks that write files."""
        names = ("master", "exp_avg", "exp_avg_sq")
        flat = {n: torch.zeros(self.buffer.param_data.numel(), dtype=torch.float32,
                               device=self.buffer.param_data.device) for n in names}
        for p in self.pieces:
            state = self.adam.state.get(p.master, {})
            flat["master"][p.lo:p.hi] = p.master
            for n in names[1:]:
                if n in state:
                    flat[n][p.lo:p.hi] = state[n]
        if self.buffer.distributed and self.ps.dp_cp > 1:
            for bucket in self.buffer.buckets:  # disjoint shards: the sum over the bucket's group is the concatenation
                group, n, _ = self.buffer.group(bucket)
                for tensor in flat.values():
                    if n > 1:
                        dist.all_reduce(tensor[bucket.start:bucket.end], group=group)
        if not self.ps.writes_checkpoint:
            return None
        flat = {n: t.cpu() for n, t in flat.items()}
        params = {state_key(self.chunks, e): {n: flat[n][e.start:e.start + e.numel].view(e.param.shape) for n in names}
                  for e in self.buffer.entries}
        return {"kind": "bridge.MixedPrecisionAdamW", "step": self._step_count(), "params": params,
                "hyper": {"betas": [self.cfg.beta1, self.cfg.beta2], "eps": self.cfg.eps,
                          "weight_decay": self.cfg.weight_decay}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masters and moments for this rank's pieces; the parameter buffer takes the masters."""
        params = state["params"]
        missing = sorted({state_key(self.chunks, p.entry) for p in self.pieces} - set(params))
        if missing:
            from bridge.errors import BridgeError

            raise BridgeError(f"the checkpoint's optimizer state lacks {missing[:4]}; was it saved for another layout?")
        step = int(state["step"])
        for p in self.pieces:
            saved = params[state_key(self.chunks, p.entry)]
            a, b = p.lo - p.entry.start, p.hi - p.entry.start
            with torch.no_grad():
                p.master.copy_(saved["master"].reshape(-1)[a:b])
                self.buffer.param_data[p.lo:p.hi].copy_(p.master)
            if step > 0:
                self.adam.state[p.master] = {
                    "step": torch.tensor(float(step), dtype=torch.float32, device=_step_device(self.adam, p.master)),
                    "exp_avg": saved["exp_avg"].reshape(-1)[a:b].to(p.master.device).clone(),
                    "exp_avg_sq": saved["exp_avg_sq"].reshape(-1)[a:b].to(p.master.device).clone()}
        self.buffer.gather_params()


def _step_device(adam: torch.optim.Optimizer, master: torch.Tensor) -> torch.device:
    """Fused AdamW keeps `step` on the parameter's device; the foreach one on the CPU."""
    return master.device if adam.defaults.get("fused") else torch.device("cpu")
