"""Weight streaming out of a live model (suite weights-1gpu): what an RL framework calls after every update.

    python bench/run.py weights-1gpu                     # one GPU: Llama-3.1-8B's shape (32 layers), TP=1, bf16
    python bench/run.py weights-1gpu --smoke             # CPU, a tiny Llama: checks the suite's code

The model is built on the device with random bf16 weights (`AutoBridge.build_model(..., load_weights=False)`); the
consumer is a preallocated HF-named buffer per weight on the same device, as an inference engine holds them.
bridge: `for name, t in export_hf_weights(model): consumer[name].copy_(t)`. Floor: the same bytes copied parameter
by parameter into buffers of the parameters' own shapes (no names, no splitting of fused tensors). Both are timed
with the device synchronised around the whole stream; medians over --reps. GB/s counts the bytes once (read and
written: twice that through memory).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench.microbench import _ms
from bench.train import MODELS, write_config


def configure(p: argparse.ArgumentParser, suite: str) -> None:
    p.add_argument("--model", choices=sorted(MODELS), default="llama-8b-8l", help="shape; --layers sets the depth")
    p.add_argument("--layers", type=int, default=32, help="layers of the shape (Llama-3.1-8B: 32)")
    p.add_argument("--reps", type=int, default=10)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bridge.parallel.state import init_distributed

    if args.smoke:
        args.model, args.layers, args.reps = "tiny", 2, 2
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    started = not torch.distributed.is_initialized()
    init_distributed("nccl" if device == "cuda" else "gloo")
    try:
        return _measure(args, device)
    finally:
        if started:  # a world of one made here (the smoke test runs in the test's process): leave none behind
            torch.distributed.destroy_process_group()


def _measure(args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    from bridge import AutoBridge, ParallelLayout

    with tempfile.TemporaryDirectory() as tmp:
        b = AutoBridge.from_hf(write_config(args.model, Path(tmp) / "model", args.layers))
        model = b.build_model(ParallelLayout(), load_weights=False, params_dtype=torch.bfloat16, device=device)
    params = [p for chunk in model for p in chunk.parameters()]
    consumer = {name: torch.empty_like(t) for name, t in b.export_hf_weights(model)}
    copies = [torch.empty_like(p) for p in params]
    nbytes = sum(t.numel() * t.element_size() for t in consumer.values())

    def stream() -> None:
        for name, tensor in b.export_hf_weights(model):
            consumer[name].copy_(tensor)

    def floor() -> None:
        for p, out in zip(params, copies):
            out.copy_(p)

    stream()  # the streamed weights are the model's, bit for bit
    for name, tensor in b.export_hf_weights(model):
        assert torch.equal(consumer[name], tensor), name
    rows = []
    for what, fn in (("copy of the parameters (floor)", floor), ("export_hf_weights -> consumer", stream)):
        ms = _ms(fn, device, args.reps, each=True, warmup=1)  # median of whole streams, each synchronised
        rows.append({"run": what, "ms": ms, "GB/s": nbytes / ms / 1e6})
    rows[1]["vs_floor"] = rows[0]["ms"] / rows[1]["ms"]
    return {"model": args.model, "layers": args.layers, "GB": nbytes / 1e9, "tensors": len(consumer), "rows": rows}
