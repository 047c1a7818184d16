"""`--profile`: PyTorch profiler over iterations [--profile-step-start, --profile-step-end) (Megatron's flags).

Each profiled rank writes a Chrome trace (`profile_rank{r}.json`, open in Perfetto or chrome://tracing)
and a table of the operators and kernels that took the most device time (`profile_rank{r}.txt`), into
--tensorboard-dir, else --save, else `./profile`. The table is what to read first: it says whether a
step is bound by matmuls, attention, communication or small elementwise kernels.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from bridge.training.config import TrainConfig

log = logging.getLogger(__name__)


class StepProfiler:
    """Starts before iteration `profile_step_start` and stops after iteration `profile_step_end - 1` (1-based)."""

    def __init__(self, cfg: TrainConfig, rank: int, device: torch.device) -> None:
        self.enabled = cfg.profile and rank in cfg.profile_ranks
        self.start, self.end, self.rank, self.device = cfg.profile_step_start, cfg.profile_step_end, rank, device
        self.folder = Path(cfg.tensorboard_dir or cfg.save or "profile")
        self.prof: torch.profiler.profile | None = None

    def before_step(self, iteration: int) -> None:
        """`iteration`: the 1-based number of the step about to run."""
        if self.enabled and self.prof is None and iteration == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.prof.__enter__()

    def edge(self, iteration: int) -> bool:
        """Whether the trace starts or ends right after `iteration`: the loop then lets the GPU finish it
        before queueing the next step, so the trace holds exactly the profiled steps."""
        return self.enabled and iteration in (self.start - 1, self.end - 1)

    def after_step(self, iteration: int) -> None:
        if self.prof is None or iteration < self.end - 1:
            return
        self.prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        trace, table = self.folder / f"profile_rank{self.rank}.json", self.folder / f"profile_rank{self.rank}.txt"
        self.prof.export_chrome_trace(str(trace))
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table.write_text(self.prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70) + "\n")
        log.info("profile of iterations %d-%d: %s, %s", self.start, self.end - 1, trace, table)
        self.prof, self.enabled = None, False
