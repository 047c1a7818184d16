"""`bridge data prepare|inspect`: build Megatron indexed datasets and look inside them."""
from __future__ import annotations

import argparse
import os

import numpy as np

from bridge.errors import BridgeError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare and inspect training data (Megatron .bin/.idx)")
    commands = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    _register_prepare(commands)
    _register_inspect(commands)


def _register_prepare(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "prepare",
        help="tokenize jsonl/parquet into PREFIX_<key>_document.{bin,idx}",
        description="Tokenize jsonl (.gz/.zst) or parquet records into Megatron indexed datasets; "
        "flags follow Megatron-LM's tools/preprocess_data.py.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="jsonl/jsonl.gz/jsonl.zst/parquet files or globs")
    p.add_argument("--input", action="append", default=[], metavar="PATH", help="an input file (repeatable)")
    p.add_argument("--json-keys", "--json-key", dest="json_keys", nargs="+", default=None, metavar="KEY",
                   help="record fields to tokenize, one dataset each (default: text; with --chat: messages)")
    p.add_argument("--output-prefix", required=True, help="outputs are PREFIX_<key>_document.{bin,idx}")
    p.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                   help="HF tokenizer: local folder, Hub id, or bridge checkpoint folder")
    p.add_argument("--append-eod", action="store_true", help="append the tokenizer's EOS id to every document")
    p.add_argument("--add-special-tokens", action="store_true",
                   help="let the tokenizer add its special tokens (e.g. BOS) to each document")
    p.add_argument("--chat", action="store_true",
                   help="records hold chat messages: render with the chat template and write a loss mask "
                   "that keeps only assistant tokens (PREFIX_<key>_document_loss_mask.{bin,idx})")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--chunk-size", type=int, default=256, help="records per worker task (default 256)")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="skip malformed JSON / missing keys with a warning instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)


def _register_inspect(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("inspect", help="documents, tokens and a sample of an indexed dataset",
                            description="Summarise a Megatron indexed dataset (PREFIX.bin/.idx).")
    p.add_argument("prefix", help="dataset prefix, e.g. corpus_text_document (or its .bin/.idx path)")
    p.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", default=None,
                   help="decode the sample with this tokenizer")
    p.add_argument("--sample", type=int, default=0, metavar="DOC", help="document to show (default 0)")
    p.add_argument("--sample-tokens", type=int, default=64, help="tokens of the sample to show (default 64)")
    p.set_defaults(func=run_inspect)


def run_prepare(args: argparse.Namespace) -> int:
    from bridge.data.prepare import PrepareConfig, prepare

    inputs = tuple(args.input) + tuple(args.inputs)
    if not inputs:
        raise BridgeError("no input files; give jsonl/parquet paths (positional or --input)")
    keys = tuple(args.json_keys) if args.json_keys else (("messages",) if args.chat else ("text",))
    result = prepare(PrepareConfig(
        inputs=inputs,
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        json_keys=keys,
        append_eod=args.append_eod,
        add_special_tokens=args.add_special_tokens,
        chat=args.chat,
        workers=args.workers,
        chunk_size=args.chunk_size,
        skip_bad_records=args.skip_bad_records,
        progress=not args.no_progress,
    ))
    for key, prefix in result.prefixes.items():
        print(f"{prefix}: {result.documents} documents, {result.tokens[key]} tokens ({result.dtype})")
    print(f"{result.records} records in {result.seconds:.1f} s, {result.tokens_per_second:,.0f} tokens/s"
          + (f"; skipped {result.skipped_bad} bad" if result.skipped_bad else "")
          + (f"; skipped {result.skipped_empty} empty" if result.skipped_empty else ""))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from bridge.data.indexed import IndexedDataset, SFTDataset, has_loss_mask

    dataset = IndexedDataset(args.prefix)
    doc_tokens = _doc_tokens(dataset)
    size = sum(os.path.getsize(f"{dataset.prefix}.{ext}") for ext in ("bin", "idx"))
    print(f"dataset    {dataset.prefix}  ({size / 2**20:.1f} MiB, tokens {dataset.dtype.name})")
    print(f"documents  {dataset.num_documents}")
    print(f"sequences  {len(dataset)}")
    print(f"tokens     {dataset.num_tokens}")
    if doc_tokens.size:
        print(f"doc length min {doc_tokens.min()}  mean {doc_tokens.mean():.1f}  max {doc_tokens.max()}")
    mask = None
    if has_loss_mask(dataset.prefix):
        sft = SFTDataset(dataset.prefix)
        trained = sum(int(m.sum()) for m in sft.loss_mask.documents())
        print(f"loss mask  {sft.loss_mask.prefix}: {trained} of {dataset.num_tokens} tokens trained "
              f"({100 * trained / max(dataset.num_tokens, 1):.1f}%)")
        mask = sft.loss_mask
    if dataset.num_documents:
        _print_sample(dataset, mask, args)
    return 0


def _doc_tokens(dataset) -> np.ndarray:
    """Tokens per document (documents may hold several sequences, or none, in other tools' files)."""
    cumulative = np.concatenate([[0], np.cumsum(dataset.sequence_lengths, dtype=np.int64)])
    return cumulative[dataset.document_indices[1:]] - cumulative[dataset.document_indices[:-1]]


def _print_sample(dataset, mask, args: argparse.Namespace) -> None:
    if not 0 <= args.sample < dataset.num_documents:
        raise BridgeError(f"--sample {args.sample} is out of range; the dataset has {dataset.num_documents} documents")
    tokens = np.asarray(dataset.document(args.sample))
    shown = tokens[: args.sample_tokens]
    print(f"sample     document {args.sample}, {tokens.size} tokens, first {shown.size}:")
    print(f"  ids   {shown.tolist()}")
    if mask is not None:
        print(f"  mask  {np.asarray(mask.document(args.sample))[: shown.size].tolist()}")
    if args.tokenizer:
        from bridge.data.tokenizer import load_tokenizer

        text = load_tokenizer(args.tokenizer).decode(shown.tolist())
        print(f"  text  {text!r}")
