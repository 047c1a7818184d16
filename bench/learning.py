"""Same learning (suite learning-1gpu): bridge and HF transformers trained from the same weights on the same tokens.

    python bench/run.py learning-1gpu                  # one H100: Llama-3.2-1B shape, 300 steps on real text
    python bench/run.py learning-1gpu --steps 100 --seq-length 512
    python bench/run.py learning-1gpu --smoke          # CPU, tiny shapes: checks the code, measures nothing

A random HF checkpoint of the shape (--seed; its values rounded to bf16 and stored in fp32, so that bridge's bf16
parameters with fp32 master copies and HF's fp32 parameters start from the same numbers) is imported with
`bridge import` and trained with `bridge train --load ... --finetune --bf16 --compile`. HF transformers trains the
same folder as HF Trainer would: fp32 parameters under bf16 autocast, SDPA, `torch.compile`, fused AdamW, gradient
clipping at 1.0. Both read the same samples in the same order (bridge's packed dataset of the text, read by both),
use the same AdamW hyper-parameters (lr --lr, betas 0.9/0.999, eps 1e-8, weight decay 0.01 on matrices only, as
Megatron and HF Trainer both exempt biases and norms) and the learning rate bridge used at each step (linear
warm-up over a quarter of the steps, cosine to lr/10). The text is this repository's .md/.py files and Python's
standard library (12 MB, no download) with a byte-level BPE of 8192 trained on it (the fp8 suite's corpus).

What the difference is read against: HF trained again from the same checkpoint (what bf16 non-determinism alone
moves) and HF from another seed's checkpoint (--noise-seed: what a change of seed moves). `smoothed_max_%`
compares 20-step moving averages with HF's first run (the curve as plotted), `final_%` the means of the last 20
steps.
"""
from __future__ import annotations

import argparse
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from bench.fp8 import compare_losses, text_corpus
from bench.train import MODELS, run_baseline, train_once, write_config


def configure(p: argparse.ArgumentParser, suite: str) -> None:
    p.add_argument("--model", choices=sorted(MODELS), default="llama-3.2-1b")
    p.add_argument("--layers", type=int)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1234, help="the checkpoint's and the data order's seed")
    p.add_argument("--noise-seed", type=int, default=7, help="HF's run from another checkpoint")
    p.add_argument("--extra-text", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                   help="more .py/.md text (default: Python's standard library)")
    p.add_argument("--corpus", type=Path, help="folder for the text and tokenizer, built once and reused")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager mode on both sides")


def write_checkpoint(config_dir: Path, out: Path, seed: int) -> Path:
    """A random HF checkpoint of the config from `seed`: transformers' own initialisation, rounded to bf16, kept fp32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    model.save_pretrained(out)
    return out


def hf_train(folder: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Train the HF checkpoint in `folder` as HF Trainer does, on bridge's samples, at bridge's learning rates."""
    import torch
    from transformers import AutoModelForCausalLM

    from bridge.data.tokenizer import load_tokenizer
    from bridge.training.data import Documents, PackedDataset, micro_batch, split_documents

    device = torch.device(opts["device"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=opts["lrs"][0], betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")
    docs = Documents([opts["data"]], text_key="text", tokenizer=load_tokenizer(opts["tokenizer"]), use_loss_mask=False,
                     vocab_size=model.config.vocab_size)
    train_ids, _, _ = split_documents(len(docs), "100,0,0")
    dataset = PackedDataset(docs, train_ids, opts["seq_length"], opts["data_seed"], opts["eod"])
    step_fn = torch.compile(model) if opts["compile"] else model
    mbs, gbs = opts["micro_batch_size"], opts["global_batch_size"]
    losses = []
    for step, lr in enumerate(opts["lrs"]):
        total = torch.zeros((), device=device)
        for j in range(gbs // mbs):
            batch = micro_batch(dataset, step * gbs + j * mbs, mbs, device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = step_fn(input_ids=batch["tokens"]).logits
            per_token = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                                                          reduction="none")
            loss = (per_token * batch["loss_mask"].flatten()).sum() / batch["loss_tokens"] / (gbs // mbs)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total))
    return {"losses": losses}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bridge.api import import_hf
    from bridge.layout import ParallelLayout

    device, max_bytes = None, 12_000_000
    if args.smoke:
        args.model, args.seq_length, args.micro_batch_size, args.global_batch_size = "tiny", 64, 2, 4
        args.steps, args.compile, device, max_bytes = 4, False, "cpu", 200_000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = args.corpus or root / "text"
        data, tokenizer, eos = text_corpus(corpus, min(8192, MODELS[args.model]["vocab_size"]),
                                           None if args.smoke else args.extra_text, max_bytes)
        config_dir = write_config(args.model, root / "config", args.layers, eos_token_id=eos, torch_dtype="float32")
        hf_a = write_checkpoint(config_dir, root / "hf-a", args.seed)
        hf_b = write_checkpoint(config_dir, root / "hf-b", args.noise_seed)
        import_hf(str(hf_a), str(root / "ckpt"), ParallelLayout())
        warmup = args.steps // 4
        b = train_once(0, load=str(root / "ckpt"), finetune=True, data_path=[str(data)], tokenizer=str(tokenizer),
                       split="100,0,0", nproc=None if args.smoke else 1, micro_batch_size=args.micro_batch_size,
                       global_batch_size=args.global_batch_size, seq_length=args.seq_length, train_iters=args.steps,
                       lr=args.lr, min_lr=args.lr / 10, lr_warmup_iters=warmup, lr_decay_style="cosine", bf16=True,
                       compile=args.compile, device=device, seed=args.seed)
        opts = {"device": device or "cuda", "lrs": b["lrs"], "data": str(data), "tokenizer": str(tokenizer),
                "eod": eos, "data_seed": args.seed, "compile": args.compile,
                **{k: getattr(args, k) for k in ("seq_length", "micro_batch_size", "global_batch_size")}}
        runs = {"HF": run_baseline(hf_train, hf_a, opts), "HF again": run_baseline(hf_train, hf_a, opts),
                f"HF, seed {args.noise_seed}": run_baseline(hf_train, hf_b, opts)}
    base, rows = runs["HF"], []
    for name, r in [*runs.items(), ("bridge", b)]:
        if "error" in r or "error" in base:
            rows.append({"run": name, "error": r.get("error") or "the HF run failed"})
            continue
        gaps = {} if r is base else compare_losses(r["losses"], base["losses"])
        rows.append({"run": name, "final_loss": r["losses"][-1], **gaps, "losses": r["losses"]})
    return {"model": args.model, "steps": args.steps, "seq_length": args.seq_length, "lrs": b["lrs"], "rows": rows}
