"""`bridge verify HF_SRC CKPT`: same logits as transformers? Prints the table; exit 1 on failure."""
from __future__ import annotations

import argparse


def run_verify(args: argparse.Namespace) -> int:
    from bridge.apps.verify import read_prompts, verify
    from bridge.parallel.state import cp_comm_type_from_flag

    result = verify(args.hf_src, args.checkpoint, prompts=read_prompts(args.prompts), dtype=args.dtype,
                    device=args.device, sequence_parallel=args.sequence_parallel, cp=args.cp,
                    cp_comm_type=cp_comm_type_from_flag(args.cp_comm_type), packed=args.packed,
                    write_json=not args.no_json, hf_config=args.hf_config)
    print(result.table())
    return 0 if result.passed else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("verify", help="compare a checkpoint's logits with transformers' (table + exit code)")
    p.add_argument("hf_src", help="the HF model the checkpoint was imported from (folder or Hub id)")
    p.add_argument("checkpoint", help="bridge checkpoint folder, or a Megatron-LM / Megatron-Bridge one with --hf-config")
    p.add_argument("--hf-config", help="for a checkpoint without bridge.json (Megatron-LM, Megatron-Bridge): the HF "
                   "model (folder or Hub id) it started from, usually HF_SRC")
    p.add_argument("--prompts", help="text file, one prompt per line (default: a built-in set of 4)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bridge's compute dtype; fp32 checks max |diff| <= 1e-4 x logit scale against transformers fp32, "
                        "bf16 that bridge is as close to transformers fp32 as transformers' own bf16 run is")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: one gloo process per rank; cuda: one GPU per rank with NCCL")
    p.add_argument("--packed", action="store_true",
                   help="run the prompts packed into one sequence, each attending only to itself (as training with "
                        "--reset-attention-mask --reset-position-ids); transformers runs each alone")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="run the sharded model with sequence parallelism (prompts cut to a multiple of TP)")
    p.add_argument("--cp", "--context-parallel-size", dest="cp", type=int, default=1,
                   help="context parallelism: run each prompt split over CP ranks (prompts cut to a multiple of 2 x cp)")
    p.add_argument("--cp-comm-type", nargs="+", default=["p2p"],
                   help="how CP ranks exchange K/V, as in `bridge train`: p2p (the ring, default), all_gather "
                        "(or allgather) or a2a")
    p.add_argument("--no-json", action="store_true", help="do not write verify.json into the checkpoint")
    p.set_defaults(func=run_verify)
