"""Megatron-LM checkpoints that bridge did not write: read their `args`, take the architecture from an HF config.

Megatron-LM's own folders have no `bridge.json`. Their `args` give the layout, spec and dtype; the
HF config (`--hf-config`, the model the run started from) gives the architecture, mapping, tokenizer
and the unpadded vocabulary. Anything the two disagree on is an error, never a guess.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bridge.checkpoint import CheckpointMeta
from bridge.config import ModelConfig
from bridge.converters.megatron_legacy import FILE_NAME, SAFE_GLOBALS, iteration_dir_name, read_tracker
from bridge.converters.torch_dist import COMMON_FILE, checkpoint_format
from bridge.converters.torch_zip import load_index
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout


def read_megatron_args(root: Path, iteration: int | None = None) -> argparse.Namespace:
    """The `args` Megatron-LM saved: in `common.pt` (torch_dist) or any rank file (legacy)."""
    fmt = checkpoint_format(root, iteration)
    folder = root / iteration_dir_name(read_tracker(root) if iteration is None else iteration)
    if fmt == "torch_dist":
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(folder / COMMON_FILE, map_location="cpu", weights_only=True)
    else:
        files = sorted(folder.glob(f"mp_rank_*/{FILE_NAME}"))
        if not files:
            raise BridgeError(f"{folder} holds no mp_rank_*/{FILE_NAME}; it is not a Megatron checkpoint")
        state = load_index(files[0], SAFE_GLOBALS)
    args = state.get("args") if isinstance(state, dict) else None
    if not isinstance(args, argparse.Namespace):
        raise BridgeError(f"{folder} has no Megatron `args`; bridge cannot tell its layout")
    return args


def _layout(args: argparse.Namespace, num_layers: int) -> ParallelLayout:
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    per_stage = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    if vpp is None and per_stage:
        vpp = num_layers // (pp * per_stage)
    return ParallelLayout(tp=getattr(args, "tensor_model_parallel_size", 1) or 1, pp=pp, vpp=vpp,
                          make_vocab_size_divisible_by=getattr(args, "make_vocab_size_divisible_by", 128))


def _check_same_model(args: argparse.Namespace, cfg: ModelConfig, layout: ParallelLayout) -> None:
    pairs = {
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "padded_vocab_size": layout.padded_vocab_size(cfg.vocab_size),
    }
    if getattr(args, "group_query_attention", False):
        pairs["num_query_groups"] = cfg.num_query_groups
    wrong = [f"{k}: checkpoint {getattr(args, k)} vs HF {v}" for k, v in pairs.items()
             if getattr(args, k, v) is not None and getattr(args, k, v) != v]
    if wrong:
        raise BridgeError(f"the HF config is not this checkpoint's model ({'; '.join(wrong)}); "
                          "give --hf-config of the model the run started from")


def meta_from_megatron(root: Path, cfg: ModelConfig, iteration: int | None = None) -> CheckpointMeta:
    """CheckpointMeta for a Megatron-LM folder, from its args and the HF model's config."""
    args = read_megatron_args(root, iteration)
    layout = _layout(args, cfg.num_layers)
    _check_same_model(args, cfg, layout)
    dtype = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32"
    return CheckpointMeta(config=cfg, layout=layout, dtype=dtype, format=checkpoint_format(root, iteration),
                          transformer_impl=getattr(args, "transformer_impl", "transformer_engine"),
                          source={"megatron_lm": str(root)})
