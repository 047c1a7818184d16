"""Learning-rate schedule: linear warmup, then cosine / linear decay to `min_lr`, or constant.

A pure function of the iteration, so the scheduler's checkpointed state is just its settings and
a resumed run recomputes exactly the same rates. Iteration `it` is 1-based (the step being taken):
warmup reaches `lr` at `it == warmup` (Megatron's first step uses lr=0 under warmup; a wasted step).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    style: str = "cosine"

    def __call__(self, it: int) -> float:
        if self.warmup_iters and it <= self.warmup_iters:
            return self.lr * it / self.warmup_iters
        if self.style == "constant":
            return self.lr
        if it >= self.decay_iters:
            return self.min_lr
        ratio = (it - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        if self.style == "linear":
            coef = 1.0 - ratio
        else:
            coef = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coef * (self.lr - self.min_lr)

    def state_dict(self) -> dict[str, Any]:
        """What Megatron's `opt_param_scheduler` entry records, in plain types."""
        return {"max_lr": self.lr, "min_lr": self.min_lr, "lr_warmup_steps": self.warmup_iters,
                "lr_decay_steps": self.decay_iters, "lr_decay_style": self.style, "schedule": asdict(self)}
