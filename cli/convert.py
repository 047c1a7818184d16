"""`bridge import | export | reshard | inspect`: checkpoint conversion commands."""
from __future__ import annotations

import argparse
import json

from bridge import api
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout


def add_layout_flags(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's flag names, short forms first."""
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--vpp", "--virtual-pipeline-model-parallel-size", dest="vpp", type=int, default=None,
                        help="virtual pipeline chunks per stage (interleaved schedule)")
    parser.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int, default=1,
                        help="expert parallel size (MoE): experts split into contiguous groups per EP rank")
    parser.add_argument("--etp", "--expert-tensor-parallel-size", dest="etp", type=int, default=None,
                        help="tensor parallel size inside each expert (default: --tp; must divide --tp)")
    parser.add_argument("--moe-grouped-gemm", action="store_true",
                        help="write experts as TEGroupedMLP (linear_fc1.weight{j}) instead of SequentialMLP (local_experts.{j})")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="pad the vocabulary to a multiple of this times TP (Megatron's default 128)")
    parser.add_argument("--transformer-impl", choices=["transformer_engine", "local"], default=None,
                        help="parameter names of Megatron's TE layer spec (default) or its local spec")


def add_format_flag(parser: argparse.ArgumentParser, default: str | None) -> None:
    """`--format` / Megatron-LM's `--ckpt-format`: legacy per-rank `torch` files or `torch_dist` (DCP)."""
    parser.add_argument("--format", "--ckpt-format", dest="format", choices=["torch", "torch_dist"], default=default,
                        help="Megatron checkpoint format: torch (per-rank files) or torch_dist (distributed, any TP/PP on load)"
                        + ("" if default else "; default: the source's"))


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """Where and how the Megatron folder is written: iteration folder name, torch_dist's common state."""
    parser.add_argument("--out-iteration", type=int, default=None,
                        help="write the checkpoint as iteration N (iter_000000N/, the tracker says N) instead of release/; "
                             "Megatron-Bridge looks for iter_* folders, Megatron-LM needs N >= 1")
    parser.add_argument("--common-pt", action=argparse.BooleanOptionalAction, default=False,
                        help="torch_dist: also write common.pt, which Megatron Core up to 0.18 needs; by default the "
                             "common state is only inside the DCP files, as Megatron Core 0.19 writes it (0.19 reads a "
                             "common.pt first and warns that it is deprecated)")


def add_hf_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-config", help="for a Megatron-LM or Megatron-Bridge checkpoint (no bridge.json): the HF "
                        "model (folder or Hub id) it started from; gives the architecture, config and tokenizer")


def add_workers_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--workers", type=int, default=1,
                        help=f"convert in N processes, one per share of the tensors (balanced by bytes), to use more "
                             f"cores; memory stays bounded per process. {what}")


def layout_from(args: argparse.Namespace) -> ParallelLayout:
    return ParallelLayout(tp=args.tp, pp=args.pp, vpp=args.vpp, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                          ep=args.ep, etp=args.etp, moe_grouped_gemm=args.moe_grouped_gemm)


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                        help="dtype of the written weights; auto keeps the source's")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run_import(args: argparse.Namespace) -> int:
    layout = layout_from(args)
    if args.adapter or args.base:
        return _import_adapter(args, layout)
    if args.source is None:
        raise BridgeError("give the HF model to import (a folder or Hub id), or --adapter PEFT_FOLDER --base CHECKPOINT")
    out = api.import_hf(args.source, args.out, layout, dtype=args.dtype,
                        transformer_impl=args.transformer_impl or "transformer_engine",
                        revision=args.revision, token=args.token, overwrite=args.overwrite, format=args.format,
                        out_iteration=args.out_iteration, common_pt=args.common_pt, workers=args.workers)
    print(f"imported {args.source} -> {out} ({args.format}, {layout.name})")
    return 0


def _import_adapter(args: argparse.Namespace, layout: ParallelLayout) -> int:
    from bridge.apps.adapter import import_adapter

    if not (args.adapter and args.base and args.out) or args.source:
        raise BridgeError("an adapter import takes --adapter PEFT_FOLDER --base CHECKPOINT --out RUN (no HF model)")
    out = import_adapter(args.adapter, args.base, args.out, layout, overwrite=args.overwrite)
    print(f"imported {args.adapter} -> {out} (a LoRA run on {args.base}, {layout.name})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from bridge.apps.adapter import export

    out = export(args.checkpoint, args.out, adapter=args.adapter, dtype=args.dtype, max_shard_size=args.max_shard_size,
                 overwrite=args.overwrite, iteration=args.iteration, hf_config=args.hf_config, workers=args.workers)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def run_reshard(args: argparse.Namespace) -> int:
    layout = layout_from(args)
    out = api.reshard(args.checkpoint, args.out, layout, transformer_impl=args.transformer_impl,
                      dtype=args.dtype, overwrite=args.overwrite, iteration=args.iteration, format=args.format,
                      hf_config=args.hf_config, out_iteration=args.out_iteration, common_pt=args.common_pt,
                      workers=args.workers)
    print(f"resharded {args.checkpoint} -> {out} ({layout.name})")
    return 0


def layout_text(layout: dict) -> str:
    """tp=2 pp=2, plus vpp, ep, etp and grouped-gemm where set (a layout's JSON, as `bridge inspect --json` gives)."""
    parts = [f"tp={layout['tp']}", f"pp={layout['pp']}"]
    parts += [f"{key}={layout[key]}" for key in ("vpp", "ep", "etp") if layout.get(key) not in (None, 1)]
    if layout.get("moe_grouped_gemm"):
        parts.append("grouped-gemm (TEGroupedMLP)")
    elif layout.get("ep") is not None:  # an MoE layout
        parts.append("sequential experts (SequentialMLP)")
    return " ".join(parts)


def run_inspect(args: argparse.Namespace) -> int:
    info = api.inspect_checkpoint(args.checkpoint, args.iteration, args.hf_config)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    total = sum(f["bytes"] for f in info["files"])
    print(f"{info['path']}\n  architecture  {info['architecture']}\n"
          f"  layout        {layout_text(info['layout'])} ({info['transformer_impl']} names)\n"
          f"  format        {info['format']}\n"
          f"  iteration     {info['iteration']}\n  parameters    {info['parameters']:,}\n"
          f"  dtypes        {', '.join(info['dtypes'])}\n"
          f"  vocab         {info['vocab']['original']} (padded {info['vocab']['padded']})\n"
          f"  files         {len(info['files'])}, {total / 2**20:.1f} MiB")
    for f in info["files"]:
        print(f"    {f['path']}  {f['bytes'] / 2**20:.1f} MiB")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("import", help="HF model (folder or Hub id) -> sharded Megatron checkpoint")
    p.add_argument("source", nargs="?", help="local HF folder or Hub id (e.g. meta-llama/Llama-3.2-1B)")
    p.add_argument("--adapter", help="an HF PEFT LoRA/DoRA folder to import as a LoRA run on --base (bridge train "
                                     "--load OUT continues it)")
    p.add_argument("--base", help="with --adapter: the bridge checkpoint of the adapter's base model")
    p.add_argument("--out", help="output folder (default: <model name>-tp{N}-pp{M})")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the login cache)")
    add_layout_flags(p)
    add_format_flag(p, "torch")
    add_output_flags(p)
    add_workers_flag(p, "Needs --format torch_dist: each process writes its own __N_0.distcp (1: one __0_0.distcp).")
    add_common(p)
    p.set_defaults(func=run_import)

    p = subparsers.add_parser("export", help="Megatron checkpoint -> HF folder that transformers loads")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--iteration", type=int, help="iteration to export (default: latest)")
    p.add_argument("--adapter", action="store_true", help="a LoRA run's adapter as an HF PEFT folder (without: the "
                                                          "adapter merged into its base)")
    add_hf_config(p)
    add_workers_flag(p, "Each process writes its own shard files: the tensors are the same byte for byte, the "
                        "shard boundaries differ from --workers 1 (each process splits its tensors by --max-shard-size).")
    add_common(p)
    p.set_defaults(func=run_export)

    p = subparsers.add_parser("reshard", help="Megatron checkpoint -> another TP/PP/VPP layout, no GPUs")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--iteration", type=int, help="iteration to read (default: latest)")
    add_hf_config(p)
    add_layout_flags(p)
    add_format_flag(p, None)
    add_output_flags(p)
    add_workers_flag(p, "Needs --format torch_dist, as for import.")
    add_common(p)
    p.set_defaults(func=run_reshard)

    p = subparsers.add_parser("inspect", help="architecture, layout, parameters, dtype and files of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--iteration", type=int)
    add_hf_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_inspect)
