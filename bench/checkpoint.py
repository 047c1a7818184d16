"""Checkpoint saves during training: GPU and host memory, save time, and the stall an async save costs.

    python bench/checkpoint.py                 # one GPU: the 8B shape (8 layers), --bf16 --compile, mbs 2, seq 4096
    python bench/checkpoint.py --smoke         # a tiny Llama on the CPU, a few iterations (checks the script)

Each variant trains --iters iterations from random weights on mock data with a save every --save-interval:
`torch` (legacy files), `torch_dist` (sync) and `torch_dist --async-save`. Per variant: peak GPU memory of the
training steps and of the saves (allocator peak, reset around each save), the time each save held training
(sync: the whole save; async: the host copy), the wall time of the run, and the host RAM peak of the rank
(ru_maxrss). Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: Llama-3.1-8B's shape at 8 of its 32 layers (the whole model with Adam does not fit one 80 GB card).
LLAMA_8B_8L = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                   tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                   hidden_act="silu", bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16")
TINY = dict(LLAMA_8B_8L, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=256, bos_token_id=1,
            eos_token_id=2, torch_dtype="float32")
VARIANTS = {"torch": dict(ckpt_format="torch"), "torch_dist": dict(ckpt_format="torch_dist"),
            "torch_dist-async": dict(ckpt_format="torch_dist", async_save=True)}


def _measured_rank(cfg: Any, plan: Any) -> dict[str, Any]:
    """Rank body: train with every save (and async finalize) wrapped to measure its time and GPU peak."""
    import torch

    from bridge.training import saver
    from bridge.training.loop import train_rank

    saves: list[dict[str, float]] = []
    real_save, real_finalize = saver.Checkpointer.save, saver.Checkpointer.finalize
    cuda = torch.cuda.is_available() and cfg.device != "cpu"

    def measured(fn: Any, kind: str) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if kind == "finalize" and self.pending is None:
                return fn(self, *args, **kwargs)
            if kind == "save":
                self.finalize()  # timed on its own, not as this save's stall
                for old in self.save_dir.glob("iter_*"):  # one 8B-shaped checkpoint fits the disk, not two
                    shutil.rmtree(old)
            if cuda:
                torch.cuda.synchronize()
                train_peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = fn(self, *args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            saves.append({"kind": kind, "seconds": time.perf_counter() - start,
                          "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                          "gpu_train_peak_gib": train_peak / 2**30 if cuda else 0.0})
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            return out
        return wrapper

    saver.Checkpointer.save = measured(real_save, "save")
    saver.Checkpointer.finalize = measured(real_finalize, "finalize")
    start = time.perf_counter()
    summary = train_rank(cfg, plan)
    wall = time.perf_counter() - start
    steps = [r["peak_mem_gib"] for r in (summary or {}).get("records", [])]
    return {"saves": saves, "wall_s": wall, "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "train_peak_gib": max(steps) if steps and cuda else 0.0}


def run_variant(name: str, model_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from bridge.launch import launch
    from bridge.training import TrainConfig
    from bridge.training.plan import make_plan

    gpu = not args.smoke
    cfg = TrainConfig(model_config=str(model_dir), mock_data=True, micro_batch_size=args.micro_batch_size,
                      global_batch_size=args.micro_batch_size, seq_length=args.seq_length, train_iters=args.iters,
                      save=str(work / name), save_interval=args.save_interval, eval_interval=0, progress=False,
                      bf16=gpu, compile=gpu, device="cuda" if gpu else "cpu", **VARIANTS[name])
    plan = make_plan(TrainConfig(**{**cfg.__dict__, "nproc": 1}))
    result = launch(_measured_rank, 1, cfg, plan, backend="nccl" if gpu else "gloo")[0]
    after = resume_and_export(work / name, args) if args.resume_export else {}
    shutil.rmtree(work / name)  # one checkpoint on disk at a time: the 8B shape's is ~40 GB with its optimizer state
    saves = [s for s in result["saves"] if s["kind"] == "save"]
    finals = [s for s in result["saves"] if s["kind"] == "finalize"]
    return {"variant": name, "saves": len(saves), "stall_s": [round(s["seconds"], 3) for s in saves],
            "finalize_s": [round(s["seconds"], 3) for s in finals],
            "gpu_train_peak_gib": max([s["gpu_train_peak_gib"] for s in result["saves"]] + [result["train_peak_gib"]]),
            "gpu_save_peak_gib": max((s["gpu_peak_gib"] for s in result["saves"]), default=0.0),
            "host_peak_gib": result["host_peak_gib"], "wall_s": result["wall_s"], **after}


def resume_and_export(save: Path, args: argparse.Namespace) -> dict[str, float]:
    """What a user does next, through the CLI: resume the run for two more iterations, then export it."""
    device = ["--device", "cpu"] if args.smoke else ["--bf16", "--device", "cuda"]
    times = {}
    for step, cmd in (("resume_s", ["train", "--load", str(save), "--mock-data", *device, "--train-iters",
                                    str(args.iters + 2), "--micro-batch-size", str(args.micro_batch_size),
                                    "--seq-length", str(args.seq_length), "--eval-iters", "1", "--no-progress"]),
                      ("export_s", ["export", str(save), "--out", str(save) + "-hf"])):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bridge.cli", *cmd], check=True)
        times[step] = round(time.perf_counter() - start, 1)
    shutil.rmtree(str(save) + "-hf")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--save-interval", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="checkpoint_bench.json")
    parser.add_argument("--resume-export", action="store_true",
                        help="after each variant: resume it for 2 iterations and export it, through the CLI")
    args = parser.parse_args()
    # two saves per variant on a GPU: the first async save pins its host buffers, the second reuses them
    args.iters = args.iters or (6 if args.smoke else 10)
    args.save_interval = args.save_interval or (2 if args.smoke else 5)
    args.seq_length = args.seq_length or (32 if args.smoke else 4096)
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(TINY if args.smoke else LLAMA_8B_8L))
        rows = []
        for name in args.variants:  # each row as it comes: a run cut short still reports the variants it finished
            rows.append(run_variant(name, model_dir, Path(tmp), args))
            print(rows[-1], flush=True)
            Path(args.out).write_text(json.dumps({"smoke": args.smoke, "args": vars(args), "rows": rows}, indent=2))
    print(f"{'variant':18} {'saves':>5} {'GPU train GiB':>13} {'GPU save GiB':>12} {'stall s 1st/later':>17} "
          f"{'finalize s':>10} {'host GiB':>8} {'wall s':>7}")
    for r in rows:
        stalls = r["stall_s"] or [0.0]
        stall = f"{stalls[0]:.2f}/{max(stalls[1:]):.2f}" if len(stalls) > 1 else f"{stalls[0]:.2f}"
        final = sum(r["finalize_s"]) / len(r["finalize_s"]) if r["finalize_s"] else 0.0
        print(f"{r['variant']:18} {r['saves']:>5} {r['gpu_train_peak_gib']:>13.2f} {r['gpu_save_peak_gib']:>12.2f} "
              f"{stall:>17} {final:>10.3f} {r['host_peak_gib']:>8.2f} {r['wall_s']:>7.1f}")
    Path(args.out).write_text(json.dumps({"smoke": args.smoke, "args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
