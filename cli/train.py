"""`bridge train`: the built-in parallel trainer (flags follow Megatron-LM's names; `--config recipe.yaml`)."""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys

from bridge.errors import BridgeError

#: (flag(s), kwargs) for every TrainConfig field that has a flag; `dest` is the field name.
_FLAGS: list[tuple[tuple[str, ...], dict]] = [
    (("--load",), dict(help="bridge checkpoint to start from (import or training checkpoint; training ones resume)")),
    (("--model-config",), dict(help="HF config.json (or its folder): random initialisation instead of --load")),
    (("--finetune",), dict(action="store_true", help="load only the weights of a training checkpoint (iteration 0)")),
    (("--data", "--data-path"), dict(dest="data_path", nargs="+", help="indexed dataset PREFIX(es) or .jsonl file(s)")),
    (("--mock-data",), dict(action="store_true", help="random tokens instead of a corpus (benchmarks)")),
    (("--split",), dict(help="train,valid,test document shares (default 969,30,1)")),
    (("--text-key",), dict(help="JSON field of .jsonl documents (default text)")),
    (("--sft",), dict(action="store_true", help="use the loss mask of `bridge data prepare --chat` data: "
                                                  "train on assistant tokens only")),
    (("--tokenizer",), dict(help="tokenizer for .jsonl data (default: the checkpoint's hf_meta/)")),
    (("--reset-attention-mask",), dict(action="store_true", help="packed documents attend only to themselves "
                                                                  "(no attention across EOD)")),
    (("--reset-position-ids",), dict(action="store_true", help="positions restart at 0 after each EOD")),
    (("--eod-mask-loss",), dict(action="store_true", help="no loss on the prediction made at each EOD")),
    (("--nproc",), dict(type=int, help="spawn N local ranks (omit under torchrun)")),
    (("--tp", "--tensor-model-parallel-size"), dict(dest="tp", type=int, help="tensor parallel ranks")),
    (("--pp", "--pipeline-model-parallel-size"), dict(dest="pp", type=int, help="pipeline stages (1F1B)")),
    (("--vpp",), dict(type=int, help="virtual pipeline chunks per stage (interleaved 1F1B)")),
    (("--ep", "--expert-model-parallel-size"), dict(dest="ep", type=int, help="expert parallelism (MoE; divides DP x CP)")),
    (("--moe-router-bias-update-rate",), dict(type=float, help="DeepSeek-V3 expert-bias step (default 1e-3)")),
    (("--mtp-num-layers",), dict(type=int, help="Megatron's MTP training: not available; a checkpoint's MTP layers are "
                                                "carried unchanged")),
    (("--cp", "--context-parallel-size"), dict(dest="cp", type=int,
                                                help="context parallelism: split each sequence over CP ranks")),
    (("--sequence-parallel",), dict(action="store_true", help="split layer norms and dropout over the TP ranks "
                                                                "along the sequence (needs --tp > 1)")),
    (("--use-distributed-optimizer",), dict(action="store_true", help="shard fp32 masters and Adam state over DP")),
    (("--use-precision-aware-optimizer",), dict(action="store_true",
                                                help="under --bf16, keep fp32 masters as 16-bit remainders beside the "
                                                     "bf16 parameters (the same masters, 2 bytes per parameter less)")),
    (("--ddp-bucket-size",), dict(type=int, help="elements per gradient all-reduce bucket")),
    (("--micro-batch-size",), dict(type=int, help="samples per forward/backward on one rank")),
    (("--global-batch-size",), dict(type=int, help="samples per step (default micro-batch-size x DP)")),
    (("--seq-length",), dict(type=int, help="tokens per sample (Megatron-LM: required)")),
    (("--train-iters",), dict(type=int, help="optimizer steps in all, a resumed run's included "
                                                    "(Megatron-LM: required)")),
    (("--lr",), dict(type=float, help="peak learning rate (Megatron-LM: required)")),
    (("--min-lr",), dict(type=float, help="learning rate at the end of the decay")),
    (("--lr-decay-style",), dict(choices=["cosine", "linear", "constant"], help="decay from --lr to --min-lr")),
    (("--lr-warmup-iters",), dict(type=int, help="linear warmup steps from 0 to --lr")),
    (("--lr-decay-iters",), dict(type=int, help="steps of the decay (default --train-iters)")),
    (("--weight-decay",), dict(type=float, help="AdamW weight decay (not on biases and norms)")),
    (("--clip-grad",), dict(type=float, help="clip the global gradient norm to this (0: off)")),
    (("--adam-beta1",), dict(type=float, help="Adam beta1")),
    (("--adam-beta2",), dict(type=float, help="Adam beta2")),
    (("--adam-eps",), dict(type=float, help="Adam epsilon")),
    (("--bf16",), dict(action="store_true", help="bf16 parameters and compute, fp32 master weights (fp32 without)")),
    (("--fp8",), dict(choices=["tensorwise", "rowwise"],
                      help="FP8 matmuls for the linear layers (torchao; H100; checkpoints stay bf16/fp32)")),
    (("--fp8-format",), dict(choices=["e4m3", "hybrid"], help="Megatron-LM's FP8 switch and gradient type: hybrid "
                                                               "(e5m2) or e4m3; with --fp8-recipe tensorwise (or "
                                                               "--fp8 R)")),
    (("--fp8-recipe",), dict(choices=["tensorwise", "delayed", "mxfp8", "blockwise", "custom"],
                             help="Megatron-LM's FP8 scaling (default delayed); bridge runs tensorwise")),
    (("--fp8-output-proj",), dict(action="store_true", help="with --fp8, the output layer (vocabulary projection) "
                                                             "in FP8 too (Megatron-LM's flag; off: bf16)")),
    (("--first-last-layers-bf16",), dict(action="store_true", help="with --fp8, the first and last transformer "
                                                                   "layers in bf16 (Megatron-LM's flag)")),
    (("--num-layers-at-start-in-bf16",), dict(type=int, help="with --first-last-layers-bf16: first layers kept "
                                                             "in bf16 (default 1)")),
    (("--num-layers-at-end-in-bf16",), dict(type=int, help="with --first-last-layers-bf16: last layers kept in "
                                                           "bf16 (default 1)")),
    (("--cp-comm-type",), dict(nargs="+", help="K/V exchange under CP: p2p (a ring, the default), all_gather "
                                               "or a2a (heads split by all-to-all); Megatron-LM's per-layer form is "
                                               "accepted when all layers agree")),
    (("--accumulate-allreduce-grads-in-fp32",), dict(action="store_true",
                                                     help="fp32 gradients under --bf16 (the default, as in Megatron-LM)")),
    (("--grad-reduce-in-bf16",), dict(action="store_true",
                                      help="under --bf16, accumulate and all-reduce gradients in bf16 instead of fp32")),
    (("--no-gradient-accumulation-fusion",), dict(dest="gradient_accumulation_fusion", action="store_false",
                                                  help="add weight gradients to the buffer in a separate pass")),
    (("--no-linear-cross-entropy-fusion",), dict(dest="linear_cross_entropy_fusion", action="store_false",
                                                  help="compute all the logits, then the loss; keep them for backward")),
    (("--no-rope-fusion",), dict(dest="rope_fusion", action="store_false",
                                 help="split q/k/v and apply RoPE without the fused Triton kernel")),
    (("--recompute", "--recompute-granularity"), dict(dest="recompute", choices=["full", "selective", "elementwise"],
                                                  help="recompute activations in backward to save memory: whole "
                                                       "layers (full), attention only (selective) or all but what "
                                                       "matmuls and attention produce (elementwise)")),
    (("--attention-backend",), dict(choices=["auto", "flash", "fused", "unfused"],
                                    help="attention kernel on CUDA: fused = cuDNN (default auto: measured fastest)")),
    (("--compile",), dict(action="store_true", help="torch.compile every transformer layer")),
    (("--lora-rank",), dict(type=int, help="train a LoRA adapter of this rank on a frozen base (docs/lora.md)")),
    (("--lora-alpha",), dict(type=float, help="LoRA scaling numerator: the adapter's output is x alpha/rank")),
    (("--lora-dropout",), dict(type=float, help="dropout on the adapter's input (default 0)")),
    (("--lora-target-modules",), dict(nargs="+", help="linears to adapt: linear_qkv linear_proj linear_fc1 "
                                                      "linear_fc2 (default all)")),
    (("--lora-use-dora",), dict(action="store_true", help="DoRA: a trained magnitude per output row")),
    (("--save",), dict(help="folder for training checkpoints (exportable with `bridge export`)")),
    (("--save-interval",), dict(type=int, help="save every N iterations (and at the end) with --save")),
    (("--keep-last-checkpoints",), dict(type=int, help="keep only this run's newest K checkpoints (with older "
                                                          "ones below them; folders past its latest save stay)")),
    (("--ckpt-format",), dict(choices=["torch", "torch_dist"], help="training checkpoints: torch (legacy per-rank "
                                                                     "files, default) or torch_dist (parallel, "
                                                                     "resumes on any layout)")),
    (("--async-save",), dict(action="store_true", help="write torch_dist checkpoints in the background")),
    (("--exit-interval",), dict(type=int, help="stop (and save) when the iteration is a multiple of this")),
    (("--eval-interval",), dict(type=int, help="validation loss every N iterations (0: only at the end)")),
    (("--eval-iters",), dict(type=int, help="validation batches per evaluation, the final one too")),
    (("--seed",), dict(type=int, help="random seed (data order, initialisation, dropout)")),
    (("--log-interval",), dict(type=int, help="a metrics line (and a train_log.jsonl record) every N "
                                                   "iterations (Megatron-LM: 100)")),
    (("--tensorboard-dir",), dict(help="write TensorBoard scalars here")),
    (("--profile",), dict(action="store_true", help="PyTorch profiler: Chrome trace + top-kernel table per rank")),
    (("--profile-step-start",), dict(type=int, help="first profiled iteration")),
    (("--profile-step-end",), dict(type=int, help="profiling stops before this iteration")),
    (("--profile-ranks",), dict(type=int, nargs="+", help="ranks that write a profile")),
    (("--no-progress",), dict(dest="progress", action="store_false", help="no progress bar: one line per "
                                                                         "--log-interval (also when not on a terminal)")),
    (("--peak-tflops",), dict(type=float, help="per-device peak for MFU (default from the GPU name)")),
    (("--device",), dict(choices=["cpu", "cuda"], help="default cuda when a GPU is visible, else cpu")),
]


def config_from_args(args: argparse.Namespace) -> "TrainConfig":  # noqa: F821
    """Recipe values first, then every flag given on the command line."""
    from bridge.training.config import TrainConfig, load_recipe

    values = load_recipe(args.config) if getattr(args, "config", None) else {}
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    given.update(megatron_spellings(vars(args)))
    try:
        return TrainConfig(**{**values, **given})
    except TypeError as exc:
        raise BridgeError(f"bad training settings: {exc}") from None


def megatron_spellings(flags: dict) -> dict:
    """TrainConfig values for Megatron-LM's --fp8-format/--fp8-recipe and --cp-comm-type: a Megatron launch line
    runs as it asks, or stops with one line where it asks for what bridge does not do.

    Megatron turns FP8 on with --fp8-format (hybrid or e4m3: the gradients' float8 type); its recipe defaults to
    delayed scaling (an amax history), which torchao (bridge's FP8) does not offer: a format without `--fp8-recipe
    tensorwise` is refused rather than run differently. With bridge's own --fp8 the format only picks the gradient
    type. A recipe without a format leaves FP8 off, as in Megatron. --cp-comm-type may name one exchange per layer
    in Megatron; bridge runs one for all layers, so the values must agree."""
    from bridge.parallel.state import cp_comm_type_from_flag

    values = {} if "cp_comm_type" not in flags else {"cp_comm_type": cp_comm_type_from_flag(flags["cp_comm_type"])}
    fmt = flags.get("fp8_format")
    if fmt is None:
        return values
    if "fp8" in flags:
        recipe = flags["fp8"]
        if flags.get("fp8_recipe", recipe) != recipe:
            raise BridgeError(f"--fp8 {recipe} and --fp8-recipe {flags['fp8_recipe']} name different recipes: keep one")
    else:
        recipe = flags.get("fp8_recipe", "delayed")
        if recipe != "tensorwise":
            raise BridgeError(f"--fp8-recipe {recipe}{' (the default)' if 'fp8_recipe' not in flags else ''} is not "
                              f"available: bridge's FP8 (torchao) scales each tensor by its current values; "
                              f"pass --fp8-recipe tensorwise")
    return {**values, "fp8": recipe, "fp8_format": fmt}


def _forward_sigterm(signum: int, frame: object) -> None:
    """--nproc: let the ranks finish their step, save and exit (they handle SIGTERM themselves)."""
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGTERM)


def run_train(args: argparse.Namespace) -> int:
    from bridge.training import train

    cfg = config_from_args(args)
    if cfg.nproc is not None:
        signal.signal(signal.SIGTERM, _forward_sigterm)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the rank's own handler takes over in the loop
    summary = train(cfg)
    if summary is not None:
        brief = {k: summary[k] for k in ("iterations", "tokens", "final_train_loss", "final_valid_loss", "loss_finite",
                                         "stopped_by")}
        print(json.dumps(brief), file=sys.stdout)
    return 0


def _with_default(kwargs: dict, default: object) -> dict:
    """The flag's help with its default (TrainConfig's), unless the help states it or it is an on/off switch."""
    text = kwargs.get("help", "")
    if kwargs.get("action") in ("store_true", "store_false") or "(default" in text or default in (None, []):
        return kwargs
    shown = " ".join(map(str, default)) if isinstance(default, list) else default
    return {**kwargs, "help": f"{text} (default: {shown})".replace("%", "%%")}


def register(subparsers: argparse._SubParsersAction) -> None:
    from bridge.training.config import TrainConfig

    defaults = TrainConfig()
    p = subparsers.add_parser(
        "train", argument_default=argparse.SUPPRESS,
        help="train with TP/SP/PP/DP (+ distributed optimizer); Megatron-LM flag names",
        description="Flags and defaults are Megatron-LM's, except where Megatron-LM has no default: --seq-length "
                    "2048, --train-iters 100 and --lr 3e-4 here, so that `bridge train --load CKPT --data D` runs; "
                    "and --log-interval 1 (Megatron-LM: 100). --config recipe.yaml sets flags from a file, the "
                    "command line wins.")
    p.add_argument("--config", help="YAML recipe: flag: value pairs")
    for flags, kwargs in _FLAGS:
        dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        p.add_argument(*flags, **_with_default(kwargs, getattr(defaults, dest, None)))
    p.set_defaults(func=run_train)
