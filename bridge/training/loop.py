"""The training loop of one rank: schedule -> gradient sync -> optimizer step -> metrics, eval, checkpoints.

The host runs one step ahead of the GPU: step n+1 is queued before step n's loss and gradient norm are
read, so the GPU does not idle while the host reads results and starts the next step (the idle time it
saves: docs/performance.md). Step n's results travel to pinned host
memory behind its own kernels and a CUDA event marks them ready; reading them never waits for step
n+1. A step after which the loop needs the finished state (a save, an evaluation, an exit, the last
step, a profile's edge) is not run ahead of, and a SIGTERM seen while step n+1 is queued stops the run
after step n+1.
"""
from __future__ import annotations

import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bridge.parallel.pipeline import activation_shape, forward_only, model_inputs
from bridge.parallel.schedules import forward_backward
from bridge.parallel.state import ParallelState
from bridge.training.config import TrainConfig
from bridge.training.metrics import MetricsLog, PeakMemory, flops_per_token, peak_tflops
from bridge.training.plan import Plan
from bridge.training.profiling import StepProfiler
from bridge.training.saver import Checkpointer
from bridge.nn.moe import update_expert_bias
from bridge.training.state import RankSetup, moe_layers, setup_rank

log = logging.getLogger(__name__)


class _StopFlag:
    """Set by SIGTERM; checked (and agreed on over all ranks) at the end of every step."""

    def __init__(self) -> None:
        self.set = False
        try:
            signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread (e.g. inside a test harness)
            pass

    def _handler(self, signum: int, frame: object) -> None:
        self.set = True


def masked_mean(loss: torch.Tensor, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token loss [b, s] -> mean over the micro-batch's trained tokens (with CP a partial sum: the CP ranks'
    parts add up)."""
    return (loss.float() * mb["loss_mask"]).sum() / mb["loss_tokens"].clamp(min=1.0)


def train_step(rs: RankSetup, micro_batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Forward and backward of one global batch on this rank; returns the last stage's micro-batch losses."""
    plan, ps, chunks = rs.plan, rs.ps, rs.chunks
    losses: list[torch.Tensor] = []

    def forward_step(c: int, x: torch.Tensor | None, m: int) -> torch.Tensor:
        mb, model = micro_batches[m], chunks[c]
        x = mb["tokens"] if model.pre_process else x
        if not model.post_process:
            return model(x, **model_inputs(mb))
        # each token's factor in the step's objective: its share of the micro-batch mean, over the micro-batches
        weights = mb["loss_mask"] / (mb["loss_tokens"].clamp(min=1.0) * plan.global_microbatches)
        if rs.cfg.linear_cross_entropy_fusion:  # the loss with its gradients, chunk by chunk, without the logits
            loss = model(x, labels=mb["labels"], loss_weights=weights, **model_inputs(mb))
        else:
            loss = (model(x, labels=mb["labels"], **model_inputs(mb)).float() * weights).sum()
        losses.append(loss.detach() * plan.global_microbatches)
        return loss

    shape = activation_shape(micro_batches[0]["tokens"], plan.model.hidden_size, ps.tp, chunks[0].sequence_parallel)
    forward_backward(chunks, ps, len(micro_batches), forward_step, rs.buffer.enable_sync, activation_shape=shape,
                     dtype=rs.buffer.param_data.dtype, device=rs.device)
    rs.buffer.finish()
    return losses


@dataclass
class _Queued:
    """A step whose work is queued on the device; `complete` reads its results."""
    iteration: int
    start: float
    lr: float
    results: torch.Tensor  # on the host once `ready` has fired: loss sum, SIGTERM flags, MoE aux sum, grad norm
    ready: torch.cuda.Event | None
    began: torch.cuda.Event | None = None  # on the device's stream where the step's work starts (CUDA)
    done: float | None = None  # host clock when the work finished, where launching it ran it (CPU)


def _sums_to_host(held: list[torch.Tensor], ps: ParallelState, device: torch.device, flags: list[float],
                  unsummed: list[torch.Tensor], timed: bool = False) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """[sum of `held` over the world, each of `flags` summed over the world, `unsummed`...] as float64 on the host.

    `held` (losses) counts only on TP rank 0 of the last stage, whose DP ranks hold different micro-batches
    and CP ranks partial sums of the same ones; `flags` (e.g. SIGTERM seen) count on every rank. Nothing
    waits: the sums are formed and all-reduced on the device and copied to pinned host memory behind the
    kernels queued so far; the returned event fires when the host copy holds them (None: already there).
    """
    holder = ps.is_last_stage and ps.tp_rank == 0
    total = (torch.stack(held).double().sum().reshape(1) if held and holder
             else torch.zeros(1, dtype=torch.float64, device=device))
    host_flags = torch.tensor(flags, dtype=torch.float64, pin_memory=device.type == "cuda")
    data = torch.cat([total, host_flags.to(device, non_blocking=True)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(data)
    data = torch.cat([data, *(t.detach().double().reshape(1) for t in unsummed)])
    if device.type != "cuda":
        return data, None
    host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
    host.copy_(data, non_blocking=True)
    ready = torch.cuda.Event(enable_timing=timed)
    ready.record()
    return host, ready


@torch.no_grad()
def evaluate(rs: RankSetup) -> float | None:
    """Mean loss over --eval-iters global batches of the validation split (the same batches every time)."""
    if rs.valid is None:
        return None
    cfg, ps = rs.cfg, rs.ps
    for chunk in rs.chunks:
        chunk.eval()
    losses: list[torch.Tensor] = []
    for i in range(cfg.eval_iters):
        mbs = rs.micro_batches(rs.valid, i * cfg.global_batch_size)
        losses += [masked_mean(o, mb) for o, mb in zip(forward_only(rs.chunks, ps, mbs), mbs)]
    for chunk in rs.chunks:
        chunk.train()
    total, ready = _sums_to_host(losses, ps, rs.device, [], [])
    if ready is not None:
        ready.synchronize()
    return total[0].item() / (cfg.eval_iters * rs.plan.global_microbatches)


def log_line(record: dict[str, Any], train_iters: int, consumed: int) -> str:
    """One iteration's figures on one line, in Megatron-LM's order and spelling."""
    parts = [f"iteration {record['iteration']:>8d}/{train_iters:>8d}", f"consumed samples: {consumed:>12d}",
             f"elapsed time per iteration (ms): {record['step_s'] * 1e3:.1f}",
             f"learning rate: {record['lr']:.6E}", f"lm loss: {record['loss']:.6E}"]
    if "moe_aux_loss" in record:
        parts.append(f"load_balancing_loss: {record['moe_aux_loss']:.6E}")
    parts += [f"grad norm: {record['grad_norm']:.3f}", f"tokens/s: {record['tokens_per_s']:.0f}"]
    if record["packing_efficiency"] < 1:  # whole-conversation samples leave padding: what was really trained
        parts += [f"real tokens/s: {record['real_tokens_per_s']:.0f}",
                  f"packing efficiency: {100 * record['packing_efficiency']:.1f}%"]
    parts.append(f"TFLOP/s/GPU: {record['tflops_per_gpu']:.3f}")
    if record.get("mfu") is not None:
        parts.append(f"MFU: {100 * record['mfu']:.1f}%")
    parts.append(f"peak memory (GiB): {record['peak_mem_gib']:.2f}")
    if record.get("valid_loss") is not None:
        parts.append(f"validation loss: {record['valid_loss']:.6E}")
    return " " + " | ".join(parts) + " |"


class Trainer:
    """Runs iterations until --train-iters, --exit-interval or SIGTERM; owns metrics and checkpoints."""

    def __init__(self, rs: RankSetup) -> None:
        self.rs, self.cfg, self.ps = rs, rs.cfg, rs.ps
        self.stop = _StopFlag()
        self.tokens_per_step = self.cfg.global_batch_size * self.cfg.seq_length
        self.flops_per_step = flops_per_token(rs.plan.model, self.cfg.seq_length,
                                              frozen_base=self.cfg.lora_rank is not None) * self.tokens_per_step
        self.peak = peak_tflops(self.cfg.peak_tflops)
        self.memory = PeakMemory()
        is_logger = self.ps.rank == 0
        save = Path(self.cfg.save) if self.cfg.save else None
        self.log = MetricsLog(save / "train_log.jsonl" if save and is_logger else None,
                              Path(self.cfg.tensorboard_dir) if self.cfg.tensorboard_dir and is_logger else None)
        self.records: list[dict[str, Any]] = []
        self.saver = Checkpointer(save, rs, fmt=self.cfg.ckpt_format, async_save=self.cfg.async_save,
                                  keep_last=self.cfg.keep_last_checkpoints) if save else None
        self.moe_layers = moe_layers(rs.chunks)
        self.profiler = StepProfiler(self.cfg, self.ps.rank, rs.device)
        self.prefetched: list[dict[str, torch.Tensor]] | None = None
        self.launched = rs.iteration  # the number of the last step queued (finished or not)
        self.stop_requested = False
        self.bar = None
        self.print_lines = False  # one line per --log-interval where there is no progress bar
        if is_logger:
            if self.cfg.progress and sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=self.cfg.train_iters, initial=rs.iteration, desc="train", unit="it")
            else:
                self.print_lines = True
            where = f"; metrics of every --log-interval {self.cfg.log_interval} in {save / 'train_log.jsonl'}" if save else ""
            log.info("training iterations %d to %d%s", rs.iteration + 1, self.cfg.train_iters, where)

    def run(self) -> dict[str, Any]:
        rs, cfg = self.rs, self.cfg
        stopped_by = "train-iters"
        queued = self.launch() if rs.iteration < cfg.train_iters else None
        while queued is not None:
            ahead = self.launch() if self.runs_ahead(queued.iteration) else None
            record = self.complete(queued)
            self.stop_requested |= record.pop("_stop")
            self.after_step(record)
            if ahead is not None:
                queued = ahead
                continue
            if self.stop_requested:
                stopped_by = "SIGTERM"
            elif cfg.exit_interval and rs.iteration % cfg.exit_interval == 0:
                stopped_by = "exit-interval"
            if stopped_by != "train-iters":
                break
            queued = self.launch() if rs.iteration < cfg.train_iters else None
        if stopped_by == "train-iters" and rs.valid is not None and (
                not rs.valid_curve or rs.valid_curve[-1][0] != rs.iteration):
            if self.ps.rank == 0:
                log.info("final validation: --eval-iters %d batches of %d samples", cfg.eval_iters,
                         cfg.global_batch_size)
            rs.valid_curve.append([rs.iteration, evaluate(rs)])
        if cfg.save and rs.saved_at != rs.iteration:
            self.save()
        if self.saver is not None:
            self.saver.finalize()  # an async save in flight completes before the run ends
        if self.bar:
            self.bar.close()
        self.log.close()
        saves = {"save_stall_s": self.saver.stall_s} if self.saver is not None else {}
        return {**rs.summary(), "stopped_by": stopped_by, "records": self.records, **saves}

    def runs_ahead(self, iteration: int) -> bool:
        """Whether step `iteration + 1` may be queued before step `iteration`'s results are read: not when the
        loop acts on the finished state after `iteration` (the same decision on every rank)."""
        cfg = self.cfg
        intervals = (cfg.save_interval if cfg.save else None, cfg.eval_interval, cfg.exit_interval)
        return not (self.stop_requested or iteration >= cfg.train_iters
                    or any(every and iteration % every == 0 for every in intervals)
                    or self.profiler.edge(iteration))

    def launch(self) -> _Queued:
        """Queue the next step: forward, backward, optimizer, the next batches' copies, its results' copy."""
        rs = self.rs
        first = rs.consumed + (self.launched - rs.iteration) * self.cfg.global_batch_size  # after the queued steps
        self.launched += 1
        iteration = self.launched
        start = time.perf_counter()
        began = None
        if rs.device.type == "cuda":
            began = torch.cuda.Event(enable_timing=True)
            began.record()
        self.profiler.before_step(iteration)
        mbs = self.prefetched if self.prefetched is not None else rs.micro_batches(rs.train, first)
        losses = train_step(rs, mbs)
        lr = rs.schedule(iteration)
        grad_norm = rs.optimizer.step(lr)
        rs.buffer.clear_grads()
        last = iteration >= self.cfg.train_iters
        self.prefetched = None if last else rs.micro_batches(rs.train, first + self.cfg.global_batch_size)
        aux = self.moe_step()
        results, ready = _sums_to_host(losses, self.ps, rs.device, [float(self.stop.set), aux], [grad_norm],
                                       timed=began is not None)
        return _Queued(iteration, start, lr, results, ready, began, None if ready is not None else time.perf_counter())

    def complete(self, queued: _Queued) -> dict[str, Any]:
        """Wait for a queued step's results (not for anything queued after it) and make its record."""
        rs = self.rs
        if queued.ready is not None:
            queued.ready.synchronize()
        # The step's own time, not the time until the host came to read it: queued ahead, a step's results are
        # read after the next step was launched (the CPU runs the whole next step in launch).
        if queued.done is not None:
            elapsed = queued.done - queued.start
        else:
            elapsed = queued.began.elapsed_time(queued.ready) / 1e3
        self.profiler.after_step(queued.iteration)
        loss_sum, stop, aux_sum, grad_norm = queued.results.tolist()
        if not math.isfinite(grad_norm):
            log.warning("gradient norm is %s at iteration %d; the update was skipped", grad_norm, queued.iteration)
        rs.iteration = queued.iteration
        real = sum(rs.train.real_tokens(k) for k in range(rs.consumed, rs.consumed + self.cfg.global_batch_size))
        rs.consumed += self.cfg.global_batch_size
        loss = loss_sum / rs.plan.global_microbatches
        rs.loss_curve.append([rs.iteration, loss])
        tflops = self.flops_per_step / elapsed / 1e12 / rs.plan.world_size
        moe = {"moe_aux_loss": aux_sum / rs.plan.global_microbatches} if self.moe_layers else {}
        run_peak, step_peak = self.memory.read()
        return {"iteration": rs.iteration, "loss": loss, **moe, "lr": queued.lr, "grad_norm": grad_norm,
                "tokens_per_s": self.tokens_per_step / elapsed, "real_tokens_per_s": real / elapsed,
                "packing_efficiency": real / self.tokens_per_step, "tflops_per_gpu": tflops,
                "mfu": tflops / self.peak if self.peak else None, "step_s": elapsed,
                "peak_mem_gib": run_peak, "step_peak_mem_gib": step_peak, "_stop": stop > 0}

    def moe_step(self) -> float:
        """After the optimizer step: DeepSeek's expert-bias update (loads summed over DP, as Megatron's
        finalize_model_grads does) and this rank's aux losses of the step (counted on TP rank 0 only, but on every TP
        rank under sequence parallelism, where each holds its sequence shard's part)."""
        if not self.moe_layers:
            return 0.0
        if self.cfg.moe_router_bias_update_rate:
            for chunk in self.rs.chunks:
                update_expert_bias(chunk, self.cfg.moe_router_bias_update_rate, self.ps.dp_cp_group)
        aux = float(sum(layer.aux_loss_sum for layer in self.moe_layers))  # one device sync, not one per layer
        for layer in self.moe_layers:
            layer.aux_loss_sum = 0.0
        return aux if self.ps.tp_rank == 0 or self.moe_layers[0].sequence_parallel else 0.0

    def after_step(self, record: dict[str, Any]) -> None:
        rs, cfg = self.rs, self.cfg
        final = rs.iteration >= cfg.train_iters and rs.valid is not None  # before the last save, which records it
        if final or (cfg.eval_interval and rs.iteration % cfg.eval_interval == 0):
            if final and self.ps.rank == 0:
                log.info("final validation: --eval-iters %d batches of %d samples", cfg.eval_iters,
                         cfg.global_batch_size)
            record["valid_loss"] = evaluate(rs)
            rs.valid_curve.append([rs.iteration, record["valid_loss"]])
        self.records.append(record)
        if rs.iteration % cfg.log_interval == 0 or "valid_loss" in record:
            self.log.write({k: v for k, v in record.items() if not k.startswith("_")})
            if self.print_lines:
                print(log_line(record, cfg.train_iters, rs.consumed), flush=True)
        if self.bar:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            self.bar.update(1)
        if cfg.save and cfg.save_interval and rs.iteration % cfg.save_interval == 0:
            self.save()

    def save(self) -> None:
        rs = self.rs
        self.saver.save(rs.iteration, rs.entries(), rs.summary())
        rs.saved_at = rs.iteration


def train_rank(cfg: TrainConfig, plan: Plan) -> dict[str, Any] | None:
    """Runs on every rank (torch.distributed initialised); rank 0 returns the run summary."""
    rs = setup_rank(cfg, plan)
    result = Trainer(rs).run()
    return result if rs.ps.rank == 0 else None
