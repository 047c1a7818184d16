"""Packed SFT training: real tokens/s of whole conversations packed with document attention, against the same
conversations padded one per sample, and against packing without the attention reset (what correctness costs).

    python bench/run.py packing-1gpu            # one H100: Llama-3.2-1B shape, seq 8192, --bf16 --compile
    python bench/run.py packing-1gpu --smoke    # CPU, tiny shapes: checks the suite's code

The data set is synthetic chat data written as `bridge data prepare --chat` writes it (tokens and a loss mask on the
reply): conversation lengths log-normal, median --median-length tokens, cut to the sequence length, so the tail is
long as in real SFT sets. `padded` writes every conversation padded to one sample (pad tokens never trained), as a
trainer without packing runs it. Real tokens/s counts the tokens of the conversations only (bridge's
`real_tokens_per_s`); each row trains --steps steps after --warmup from the same random weights.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.train import train_once, write_config

#: The runs: (name, padded one conversation per sample, Megatron-LM's packing flags on).
RUNS = (("packed", False, True), ("padded per sample", True, False), ("packed, no attention reset", False, False))
EOS = 2  # write_config's eos_token_id
PAD = 0


def write_chats(prefix: Path, count: int, seq_length: int, median: int, vocab: int, *, padded: bool,
                seed: int) -> np.ndarray:
    """`count` conversations (prompt then reply, the reply trained, EOS last); `padded`: each padded to a sample.
    Returns the conversations' lengths."""
    from bridge.data.indexed import IndexedDatasetWriter, loss_mask_prefix

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 1.0, count).astype(int), 8, seq_length)
    with IndexedDatasetWriter(prefix, np.int32) as tokens, \
            IndexedDatasetWriter(loss_mask_prefix(prefix), np.uint8) as masks:
        for n in lengths:
            chat = np.append(rng.integers(3, vocab, n - 1), EOS)
            mask = np.zeros(n, np.uint8)
            mask[n // 2:n - 1] = 1
            if padded:  # conversation, pads, and the EOS that ends the sample's one document
                chat = np.concatenate([chat[:-1], np.full(seq_length - n, PAD), [EOS]])
                mask = np.concatenate([mask[:-1], np.zeros(seq_length - n + 1, np.uint8)])
            tokens.add_document(chat)
            masks.add_document(mask)
    return lengths


def configure(p: argparse.ArgumentParser, suite: str) -> None:
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--median-length", type=int, default=400, help="median conversation length (tokens)")
    p.add_argument("--conversations", type=int, default=4000)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4, help="untimed first steps (compilation)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, compile_ = "cuda", True
    if args.smoke:
        args.model, args.seq_length, args.median_length, args.conversations = "tiny", 64, 12, 300
        args.micro_batch_size, args.global_batch_size, args.steps, args.warmup = 2, 2, 2, 1
        device, compile_ = "cpu", False
    from bench.train import MODELS

    vocab = MODELS[args.model]["vocab_size"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = write_config(args.model, Path(tmp) / "config")
        for name, padded, flags in RUNS:
            prefix = Path(tmp) / name.replace(" ", "-").replace(",", "")
            lengths = write_chats(prefix, args.conversations, args.seq_length, args.median_length, vocab,
                                  padded=padded, seed=0)
            r = train_once(args.warmup, model_config=str(config_dir), data_path=[str(prefix)], sft=True,
                           split="100,0,0", reset_attention_mask=flags, reset_position_ids=flags, eod_mask_loss=flags,
                           micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                           seq_length=args.seq_length, train_iters=args.warmup + args.steps, lr=1e-4,
                           bf16=not args.smoke, compile=compile_, device=device)
            # padded: the pads sit inside the sample's one document, so the trainer counts them; its real tokens are
            # the conversations' (mean length over the sample length)
            real = lengths.mean() / (args.seq_length + 1) if padded else r["packing_efficiency"]
            rows.append({"run": name, "real_tokens_per_s": r["tokens_per_s"] * real, "tokens_per_s": r["tokens_per_s"],
                         "packing_%": 100 * real, "peak_gib": r["peak_mem_gib"]})
    packed = rows[0]["real_tokens_per_s"]
    for row in rows:
        row["vs_packed"] = row["real_tokens_per_s"] / packed
    return {"model": args.model, "seq_length": args.seq_length, "median_length": args.median_length,
            "goal": "packed >= 3x padded per sample in real tokens/s, within 10% of packed without the attention reset",
            "rows": rows}


