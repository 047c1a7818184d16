"""Megatron checkpoints that bridge did not write: read their recorded settings, take the architecture from an HF config.

Megatron-LM's and Megatron-Bridge's folders have no `bridge.json`. The layout, spec and dtype come from what the
run recorded: Megatron-LM's `args` (in a legacy rank file, or in the common state of a `torch_dist` folder:
`common.pt` up to Megatron Core 0.18, the DCP entry `common_state/shard_0_1` from 0.19), else Megatron-Bridge's
`run_config.yaml` (its `model:` section, TransformerConfig field names, in the iteration folder beside the DCP
files), whose common state holds no `args`. The HF config (`--hf-config`, the model the run started from) gives
the architecture, mapping, tokenizer and the unpadded vocabulary. The vocabulary rows may carry any padding (none,
as Megatron-Bridge keeps it, or Megatron-LM's), at least the HF vocabulary; the checkpoint's own row count is
recorded. Anything the two disagree on is an error, never a guess.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import yaml

from bridge.checkpoint import CheckpointMeta
from bridge.config import ModelConfig
from bridge.converters.megatron_legacy import FILE_NAME, SAFE_GLOBALS, check_iteration, iteration_dir_name, read_tracker
from bridge.converters.torch_dist import RUN_CONFIG, checkpoint_format, read_common_state
from bridge.converters.torch_zip import load_index
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout

EMBEDDING = "embedding.word_embeddings.weight"
#: Megatron-LM `args` name -> how to read it from a Megatron-Bridge `model:` section (TransformerConfig /
#: GPTModelProvider fields); names both spell alike are copied as they are.
_FROM_RUN_CONFIG: dict[str, Callable[[dict[str, Any]], Any]] = {
    "untie_embeddings_and_output_weights": lambda m: not m.get("share_embeddings_and_output_weights", True),
    "group_query_attention": lambda m: m.get("num_query_groups") not in (None, m.get("num_attention_heads")),
    "transformer_impl": lambda m: m.get("transformer_impl") or "transformer_engine",
}
_SAME_NAMES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
               "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
               "make_vocab_size_divisible_by", "bf16", "fp16")


def _iteration_folder(root: Path, iteration: int | None) -> Path:
    check_iteration(root, iteration)
    return root / iteration_dir_name(read_tracker(root) if iteration is None else iteration)


def read_megatron_args(root: Path, iteration: int | None = None) -> tuple[argparse.Namespace, str]:
    """The settings the run recorded, as Megatron-LM's `args`, and where they were found.

    Megatron-LM's own `args` when the checkpoint has them, else Megatron-Bridge's `run_config.yaml`.
    """
    folder = _iteration_folder(root, iteration)
    if checkpoint_format(root, iteration) == "torch_dist":
        from bridge.converters.dcp import DcpReader  # torch.distributed.checkpoint loads only for this format

        state, where = read_common_state(folder, DcpReader(folder)), f"{folder}'s common state"
    else:
        files = sorted(folder.glob(f"mp_rank_*/{FILE_NAME}"))
        if not files:
            raise BridgeError(f"{folder} holds no mp_rank_*/{FILE_NAME}; it is not a Megatron checkpoint")
        state, where = load_index(files[0], SAFE_GLOBALS), str(files[0])
    args = state.get("args") if isinstance(state, dict) else None
    if isinstance(args, argparse.Namespace):
        return args, where
    config = next((p for p in (folder / RUN_CONFIG, root / RUN_CONFIG) if p.is_file()), None)
    if config is None:
        raise BridgeError(f"{folder} has no Megatron-LM `args` ({where}) and no {RUN_CONFIG} (Megatron-Bridge); "
                          "bridge cannot tell its layout")
    return args_from_run_config(config), str(config)


def args_from_run_config(path: Path) -> argparse.Namespace:
    """Megatron-Bridge's `run_config.yaml` `model:` section as the Megatron-LM `args` bridge reads."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BridgeError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("num_layers"), int):
        raise BridgeError(f"{path} has no `model:` section with num_layers; it is not Megatron-Bridge's run configuration")
    wrong = [f"{name}: {model[name]!r}" for name in _SAME_NAMES if name in model
             and not (model[name] is None or type(model[name]) is (bool if name in ("bf16", "fp16") else int))]
    if wrong:
        raise BridgeError(f"{path}: `model:` has {', '.join(wrong)}; expected whole numbers (bf16/fp16: true or false)")
    args = argparse.Namespace(**{name: model[name] for name in _SAME_NAMES if name in model})
    for name, read in _FROM_RUN_CONFIG.items():
        setattr(args, name, read(model))
    return args


def _layout(args: argparse.Namespace, num_layers: int) -> ParallelLayout:
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    per_stage = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    if vpp is None and per_stage:
        vpp = num_layers // (pp * per_stage)
    return ParallelLayout(tp=getattr(args, "tensor_model_parallel_size", 1) or 1, pp=pp, vpp=vpp,
                          make_vocab_size_divisible_by=getattr(args, "make_vocab_size_divisible_by", 128) or 1)


def _vocab_rows(root: Path, iteration: int | None, fmt: str, args: argparse.Namespace) -> int | None:
    """Rows of the stored embedding: the DCP's global shape (torch_dist), else `args.padded_vocab_size`."""
    if fmt == "torch_dist":
        folder = _iteration_folder(root, iteration)
        from bridge.converters.dcp import DcpReader

        dcp = DcpReader(folder)
        key = next((k for k in dcp.tensor_keys() if k.endswith(EMBEDDING) and k.removesuffix(EMBEDDING) in
                    ("", "model.", "model.module.", "model.module.module.")), None)
        return None if key is None else int(dcp.tensor_meta(key).size[0])
    return getattr(args, "padded_vocab_size", None)


def _check_same_model(args: argparse.Namespace, cfg: ModelConfig, layout: ParallelLayout, rows: int | None,
                      where: str) -> None:
    pairs = {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
             "num_attention_heads": cfg.num_attention_heads,
             "untie_embeddings_and_output_weights": not cfg.tie_word_embeddings}
    if getattr(args, "group_query_attention", False):
        pairs["num_query_groups"] = cfg.num_query_groups
    wrong = [f"{k}: checkpoint {getattr(args, k)} vs HF {v}" for k, v in pairs.items()
             if getattr(args, k, v) is not None and getattr(args, k, v) != v]
    if rows is not None and rows < cfg.vocab_size:
        wrong.append(f"vocabulary: checkpoint {rows} rows vs HF {cfg.vocab_size}")
    if wrong:
        raise BridgeError(f"the HF config is not this checkpoint's model ({'; '.join(wrong)}; from {where}); "
                          "give --hf-config of the model the run started from")
    if rows is not None and rows % layout.tp:
        raise BridgeError(f"{where}: {rows} vocabulary rows do not divide over tensor parallel size {layout.tp}; "
                          "the checkpoint is not one Megatron wrote")


def meta_from_megatron(root: Path, cfg: ModelConfig, iteration: int | None = None) -> CheckpointMeta:
    """CheckpointMeta for a Megatron-LM or Megatron-Bridge folder, from its recorded settings and the HF model's config."""
    args, where = read_megatron_args(root, iteration)
    layout = _layout(args, cfg.num_layers)
    fmt = checkpoint_format(root, iteration)
    rows = _vocab_rows(root, iteration, fmt, args)
    _check_same_model(args, cfg, layout, rows, where)
    dtype = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32"
    return CheckpointMeta(config=cfg, layout=layout, dtype=dtype, format=fmt,
                          transformer_impl=getattr(args, "transformer_impl", "transformer_engine"),
                          source={"megatron_lm": str(root), "settings": where},
                          padded_vocab=rows if rows is not None and rows != layout.padded_vocab_size(cfg.vocab_size) else None)
