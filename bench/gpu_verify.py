"""GPU acceptance run: a Llama-3.2-1B-shaped model, imported at TP=2, verified over 2 GPUs (NCCL) in bf16.

    python bench/gpu_verify.py [--workdir DIR] [--device cuda] [--also-fp32] [--scale-config ...]
    python bench/gpu_verify.py --tp 1 --cp 2 --also-fp32    # context parallel (the ring) over 2 GPUs instead

Builds the HF model locally from bench/configs/meta-llama--Llama-3.2-1B.json (a copy of the real config) with random
weights (no download), imports it with `bridge import --tp 2`, runs `bridge verify --dtype bf16
--device cuda` (2 ranks, NCCL) and prints the table; exit code 0 only if every verify passed.

Why the embeddings are scaled: with purely random weights the top logits of a 128k vocabulary lie
within bf16 noise of each other, so top-1 agreement would measure rounding, not correctness. Scaling
the (tied) embedding to unit variance makes the residual stream carry the token, so the model has
clear preferences as a trained model does; attention and MLP still contribute and are checked by the
max/mean abs and cosine columns. `--also-fp32` adds the fp32 run (threshold 1e-4 x logit scale).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
#: A copy of the real config.json (../shared is not on the device machines).
CONFIG = ROOT / "bench" / "configs" / "meta-llama--Llama-3.2-1B.json"


def build_model(out: Path, config_path: Path, overrides: dict, embed_std: float, seed: int = 0) -> Path:
    """The HF model with random (seeded) weights, saved in bf16 safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads(config_path.read_text())
    data.update(overrides)
    data.pop("_name_or_path", None)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.mul_(embed_std / emb.std())
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to build the model (default: a temporary folder)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--cp", type=int, default=1, help="context parallel ranks per prompt (world = tp x cp)")
    parser.add_argument("--also-fp32", action="store_true", help="also verify in fp32")
    parser.add_argument("--embed-std", type=float, default=1.0, help="std of the random embedding (see docstring)")
    parser.add_argument("--override", default="{}", help="JSON config overrides, e.g. to shrink the model for a CPU dry run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bridge.api import import_hf
    from bridge.layout import ParallelLayout
    from bridge.verify import verify

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bridge-gpu-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    hf = build_model(work / "llama-1b-random", CONFIG, json.loads(args.override), args.embed_std)
    print(f"built {hf} in {time.time() - t0:.0f}s", flush=True)
    ckpt = import_hf(hf, work / f"llama-1b-tp{args.tp}", ParallelLayout(tp=args.tp), dtype="bf16", overwrite=True)
    print(f"imported -> {ckpt} (TP={args.tp}); GPUs visible: {torch.cuda.device_count()}", flush=True)
    ok = True
    for dtype in ["bf16"] + (["fp32"] if args.also_fp32 else []):
        t0 = time.time()
        result = verify(hf, ckpt, dtype=dtype, device=args.device, cp=args.cp)
        print(result.table())
        print(f"({dtype} verify took {time.time() - t0:.0f}s)\n", flush=True)
        ok &= result.passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
