"""Data preparation (suite data): `bridge data prepare` tokens/s for 1 and N workers against the tokenizer.

    python bench/run.py data                       # ~10 MB corpus from the Python standard library's sources
    python bench/run.py data --workers 1 2 4 --mb 50 --tokenizer ./Llama-3.2-1B

All numbers come from one run on the same texts. The baseline is what a user would write in one
process: `tokenizer(batch, add_special_tokens=False)` over batches of the texts already in memory
(no JSON, no disk), with the Rust tokenizer held to one thread (TOKENIZERS_PARALLELISM=false), so
it is a single-core baseline. `prepare` is measured end to end: read jsonl, parse, tokenize, write
.bin/.idx. Without `--tokenizer`, a byte-level BPE is trained on the corpus (no downloads). Each variant runs
--repeat times, interleaved so that a noisy moment hits every variant alike, and the best time counts. Other
processes on the machine skew wall times: the table's load average shows how busy it was.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def build_corpus(megabytes: float, doc_chars: int = 4000) -> list[str]:
    """Documents cut from the standard library's .py files (real code and prose), repeated to size."""
    root = Path(os.__file__).parent
    docs: list[str] = []
    size = 0
    files = sorted(root.rglob("*.py"))
    while size < megabytes * 1e6:
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for start in range(0, len(text), doc_chars):
                docs.append(text[start : start + doc_chars])
                size += len(docs[-1])
            if size >= megabytes * 1e6:
                break
    return docs


def train_tokenizer(docs: list[str], folder: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(docs[: max(1, len(docs) // 4)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def bench_direct(tokenizer, docs: list[str], batch: int = 256) -> tuple[float, int]:
    """The baseline: the HF tokenizer called on batches of in-memory texts."""
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(docs), batch):
        tokens += sum(map(len, tokenizer(docs[i : i + batch], add_special_tokens=False)["input_ids"]))
    return time.perf_counter() - start, tokens


def bench_backend(tokenizer, docs: list[str], batch: int = 256) -> tuple[float, int]:
    """For reference: the Rust backend's encode_batch without transformers' wrapper (what workers call)."""
    backend = tokenizer.backend_tokenizer
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(docs), batch):
        tokens += sum(len(e.ids) for e in backend.encode_batch(docs[i : i + batch], add_special_tokens=False))
    return time.perf_counter() - start, tokens


def bench_prepare(data: Path, tok_dir: Path, out: Path, workers: int) -> tuple[float, int]:
    from bridge.data.prepare import PrepareConfig, prepare

    start = time.perf_counter()
    result = prepare(PrepareConfig(inputs=(str(data),), output_prefix=str(out / f"w{workers}"),
                                   tokenizer=str(tok_dir), workers=workers, progress=False))
    return time.perf_counter() - start, result.tokens["text"]


def configure(p: argparse.ArgumentParser, suite: str) -> None:
    p.add_argument("--mb", type=float, default=10, help="corpus size in MB of text")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizer", help="HF tokenizer folder (default: train a BPE)")
    p.add_argument("--vocab", type=int, default=32000, help="vocab of the trained BPE")
    p.add_argument("--repeat", type=int, default=3, help="runs per variant; the best counts")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bridge.data.tokenizer import load_tokenizer

    if args.smoke:
        args.mb, args.vocab, args.repeat, args.tokenizer = 0.1, 300, 1, None
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a single-thread baseline; prepare's workers set it themselves
    docs = build_corpus(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tok_dir = Path(args.tokenizer) if args.tokenizer else train_tokenizer(docs, tmp_path / "tok", args.vocab)
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        runs: dict[str, Callable[[], tuple[float, int]]] = {
            "tokenizer(batch), 1 thread": lambda: bench_direct(load_tokenizer(str(tok_dir)), docs),
            "backend.encode_batch, 1 thread": lambda: bench_backend(load_tokenizer(str(tok_dir)), docs),
        }
        for workers in args.workers:
            runs[f"bridge data prepare, {workers} worker(s)"] = lambda w=workers: bench_prepare(data, tok_dir, tmp_path, w)
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.repeat):
            for name, fn in runs.items():
                seconds, tokens = fn()
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, tokens)
    base_seconds, base_tokens = best["tokenizer(batch), 1 thread"]
    rows = [{"variant": name, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
             "vs_direct": tokens / seconds / (base_tokens / base_seconds)} for name, (seconds, tokens) in best.items()]
    mismatch = [r["variant"] for r in rows if r["tokens"] != base_tokens]
    return {"corpus_mb": sum(map(len, docs)) / 1e6, "documents": len(docs), "cpus": os.cpu_count(),
            "load_average": os.getloadavg()[0], "failed": bool(mismatch),
            **({"token_count_mismatch": mismatch} if mismatch else {}), "rows": rows}
