"""Check a `TrainConfig` against the model, the data and the world size before any process starts.

`make_plan` raises a one-line BridgeError for every bad combination the workers would otherwise hit
minutes later inside a collective (or worse, train with silently wrong batches).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bridge.checkpoint import CheckpointMeta
from bridge.config import ModelConfig
from bridge.data.indexed import IndexedDataset, has_loss_mask, strip_suffix
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from bridge.models import load_hf_config
from bridge.nn.attention import ATTENTION_BACKENDS
from bridge.nn.fp8 import check_fp8_device, check_fp8_recipe
from bridge.parallel.context import check_seq_length
from bridge.parallel.state import check_context_parallel
from bridge.training.checkpoint_flags import check_checkpoint_flags
from bridge.training.config import LR_DECAY_STYLES, RECOMPUTE, TrainConfig
from bridge.training.lora_run import check_lora, check_targets

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What the workers need beyond the config: the model, the layout, the batch arithmetic."""

    model: ModelConfig
    layout: ParallelLayout
    world_size: int
    dp: int
    num_microbatches: int
    """Micro-batches per DP rank per step."""
    transformer_impl: str = "transformer_engine"
    cp: int = 1
    """Context-parallel size: CP ranks share micro-batches (each holds 2 of the 2*cp chunks of every sequence)."""
    load_meta: CheckpointMeta | None = None

    @property
    def global_microbatches(self) -> int:
        return self.num_microbatches * self.dp


def world_size(cfg: TrainConfig) -> int:
    """--nproc, else torchrun's WORLD_SIZE, else 1."""
    if cfg.nproc is not None:
        return cfg.nproc
    return int(os.environ.get("WORLD_SIZE", "1"))


def _model(cfg: TrainConfig) -> tuple[ModelConfig, CheckpointMeta | None, str]:
    if (cfg.load is None) == (cfg.model_config is None):
        raise BridgeError("give exactly one of --load CHECKPOINT (a bridge checkpoint) or --model-config config.json "
                          "(random initialisation)")
    if cfg.load is not None:
        meta = CheckpointMeta.load(Path(cfg.load))
        return meta.config, meta, meta.transformer_impl
    path = Path(cfg.model_config)
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        raise BridgeError(f"--model-config {path} is not an HF config.json (or a folder holding one)")
    model = load_hf_config(folder)
    if model.mtp_layers:
        log.info("random initialisation without the config's %d MTP layers: bridge's model does not build them",
                 model.mtp_layers)
    return model.replace(mtp_layers=0), None, "transformer_engine"


def _check_mtp(cfg: TrainConfig, model: ModelConfig) -> None:
    """MTP layers are carried, not trained: Megatron's --mtp-num-layers is refused, and so is a torch_dist save,
    which writes the model's own tensors only and would drop them."""
    if cfg.mtp_num_layers:
        raise BridgeError(f"--mtp-num-layers {cfg.mtp_num_layers}: bridge does not train multi-token prediction layers; "
                          f"drop the flag (a checkpoint's MTP layers are carried unchanged into the saves)")
    if model.mtp_layers and cfg.ckpt_format == "torch_dist":
        raise BridgeError(f"--ckpt-format torch_dist would drop {model.architecture}'s {model.mtp_layers} MTP layers, "
                          "which bridge carries but does not train: use --ckpt-format torch")


def _check_data(cfg: TrainConfig, vocab_size: int) -> None:
    if cfg.mock_data:
        return
    if not cfg.data_path:
        raise BridgeError("no training data: give --data PREFIX (from `bridge data prepare`) or FILE.jsonl, or --mock-data")
    for item in cfg.data_path:
        if item.endswith(".jsonl"):
            if not Path(item).is_file():
                raise BridgeError(f"data file {item} does not exist")
            continue
        prefix = strip_suffix(item)
        missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not Path(p).is_file()]
        if missing:
            raise BridgeError(f"data files {', '.join(missing)} do not exist; give the prefix `bridge data prepare` "
                              "printed, or a .jsonl file")
        if cfg.sft and not has_loss_mask(prefix):
            raise BridgeError(f"--sft needs a loss mask next to {prefix} (from `bridge data prepare --chat`); "
                              "prepare the data with --chat or drop --sft")
        _check_token_ids(prefix, vocab_size)
    if cfg.sft and any(item.endswith(".jsonl") for item in cfg.data_path):
        raise BridgeError("--sft trains on prepared chat data; run `bridge data prepare --chat` on the .jsonl first")


def _check_token_ids(prefix: str, vocab_size: int) -> None:
    """Every token id must index a row of the model's vocabulary (the HF vocab_size, not the padded one: padding
    rows are excluded from the softmax and never trained). Out of range, an id would train silently on a padding
    row or fail deep inside a rank; this reads the whole data file once, at disk speed, unless its dtype cannot
    hold a bad id."""
    dataset = IndexedDataset(prefix)
    if dataset.dtype.kind == "u" and np.iinfo(dataset.dtype).max < vocab_size:
        return
    ids = dataset.token_range()
    if ids is None:
        return
    low, high = ids
    if high >= vocab_size or low < 0:
        raise BridgeError(f"{prefix} holds token ids {low} to {high}, but the model's vocabulary has {vocab_size} "
                          f"tokens (ids 0 to {vocab_size - 1}); prepare the data with this model's tokenizer")


def _check_numbers(cfg: TrainConfig) -> None:
    positive = ("micro_batch_size", "global_batch_size", "seq_length", "train_iters", "eval_iters", "log_interval",
                "keep_last_checkpoints")
    for name in positive:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise BridgeError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if cfg.lr_decay_style not in LR_DECAY_STYLES:
        raise BridgeError(f"--lr-decay-style {cfg.lr_decay_style} is not one of {', '.join(LR_DECAY_STYLES)}")
    if cfg.recompute is not None and cfg.recompute not in RECOMPUTE:
        raise BridgeError(f"--recompute {cfg.recompute} is not one of {', '.join(RECOMPUTE)}")
    if cfg.min_lr > cfg.lr:
        raise BridgeError(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}")
    if cfg.lr_warmup_iters < 0 or cfg.lr_warmup_iters > (cfg.lr_decay_iters or cfg.train_iters):
        raise BridgeError(f"--lr-warmup-iters {cfg.lr_warmup_iters} must be between 0 and the decay iterations")
    if cfg.attention_backend not in ATTENTION_BACKENDS:
        raise BridgeError(f"--attention-backend {cfg.attention_backend} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if cfg.profile and not 1 <= cfg.profile_step_start < cfg.profile_step_end:
        raise BridgeError(f"--profile-step-start {cfg.profile_step_start} must be >= 1 and below --profile-step-end "
                          f"{cfg.profile_step_end}")
    if cfg.save_interval is not None and cfg.save is None:
        raise BridgeError("--save-interval needs --save DIR")
    if cfg.device not in (None, "cpu", "cuda"):
        raise BridgeError(f"--device {cfg.device} is not cpu or cuda")
    if cfg.split:
        parts = cfg.split.replace("/", ",").split(",")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise BridgeError(f"--split {cfg.split!r} is not comma-separated numbers like 969,30,1") from None
        if not weights or any(w < 0 for w in weights) or weights[0] <= 0:
            raise BridgeError(f"--split {cfg.split!r} needs a positive training share")


def _check_expert_parallel(cfg: TrainConfig, dp: int, meta: CheckpointMeta | None) -> None:
    """EP ranks are carved out of DP x CP (Megatron: expert-DP = dp*cp*tp/(ep*etp), with etp = tp here), so
    ep | dp*cp = world/(tp*pp)."""
    if cfg.ep < 1:
        raise BridgeError(f"--ep must be >= 1, got {cfg.ep}")
    if cfg.ep == 1:
        return
    if (dp * cfg.cp) % cfg.ep:
        what = "the data-parallel size world/(tp*pp)" if cfg.cp == 1 else "dp x cp = world/(tp*pp)"
        raise BridgeError(f"--ep {cfg.ep} must divide {what} = {dp * cfg.cp}; start "
                          f"--nproc {cfg.tp * cfg.pp * cfg.ep} (tp*pp*ep) or a multiple of it")


def make_plan(cfg: TrainConfig) -> Plan:
    """Validate everything checkable without starting a process; BridgeError on the first problem."""
    _check_numbers(cfg)
    check_lora(cfg)
    model, meta, impl = _model(cfg)
    check_targets(cfg, model, grouped_experts=meta is not None and meta.layout.moe_grouped_gemm)
    grouped = meta.layout.moe_grouped_gemm if meta is not None else False  # keep the checkpoint's expert names
    layout = ParallelLayout(tp=cfg.tp, pp=cfg.pp, vpp=cfg.vpp, ep=cfg.ep, moe_grouped_gemm=grouped)
    layout.validate(model)
    world = world_size(cfg)
    model_parallel = cfg.tp * cfg.cp * cfg.pp
    if world < 1 or world % model_parallel:
        what = f"tp*pp = {cfg.tp}*{cfg.pp}" if cfg.cp == 1 else f"tp*cp*pp = {cfg.tp}*{cfg.cp}*{cfg.pp}"
        raise BridgeError(f"world size {world} is not divisible by {what}; "
                          f"start a multiple of {model_parallel} processes")
    dp = world // model_parallel
    _check_context_parallel(cfg, model)
    _check_packing(cfg)
    _check_expert_parallel(cfg, dp, meta)
    per_step = cfg.micro_batch_size * dp
    global_batch = cfg.global_batch_size or per_step  # not given: one micro-batch per DP rank (Megatron-LM's rule)
    if global_batch % per_step:
        raise BridgeError(f"--global-batch-size {global_batch} is not a multiple of micro-batch-size x DP = "
                          f"{cfg.micro_batch_size} x {dp} = {per_step}")
    microbatches = global_batch // per_step
    if cfg.seq_length > model.max_position_embeddings:
        raise BridgeError(f"--seq-length {cfg.seq_length} is above the model's limit of {model.max_position_embeddings} "
                          "positions (max_position_embeddings); use a shorter sequence")
    if cfg.sequence_parallel and (cfg.seq_length // cfg.cp) % cfg.tp:
        raise BridgeError(f"--sequence-parallel splits each rank's {cfg.seq_length // cfg.cp} tokens over tp={cfg.tp}: "
                          f"--seq-length {cfg.seq_length} / cp {cfg.cp} is not divisible")
    if layout.chunks > 1 and microbatches % cfg.pp:
        raise BridgeError(f"the interleaved schedule needs the micro-batches per DP rank ({microbatches}) to be a multiple "
                          f"of --pp {cfg.pp}; raise --global-batch-size or lower --micro-batch-size")
    _check_grad_dtype(cfg)
    check_checkpoint_flags(cfg)
    _check_mtp(cfg, model)
    if cfg.resolved_device() == "cuda":
        import torch

        found = torch.cuda.device_count()
        if found == 0:
            raise BridgeError("--device cuda but no CUDA GPU is visible on this machine; use --device cpu")
        if found < (cfg.nproc or 1):
            raise BridgeError(f"--nproc {cfg.nproc} needs {cfg.nproc} GPUs, found {found}; use --nproc {found} or "
                              "fewer, or --device cpu")
    _check_fp8(cfg, model)
    _check_data(cfg, model.vocab_size)
    return Plan(model=model, layout=layout, world_size=world, dp=dp, num_microbatches=microbatches,
                transformer_impl=impl, cp=cfg.cp, load_meta=meta)


def _check_grad_dtype(cfg: TrainConfig) -> None:
    """fp32 gradients unless --bf16 --grad-reduce-in-bf16 (Megatron-LM's rule); contradicting flags are an error."""
    if cfg.grad_reduce_in_bf16 and cfg.accumulate_allreduce_grads_in_fp32:
        raise BridgeError("--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 contradict each other; "
                          "keep one (fp32 gradients are the default)")
    if not cfg.bf16 and cfg.grad_reduce_in_bf16:
        raise BridgeError("--grad-reduce-in-bf16 needs --bf16: fp32 training keeps fp32 gradients")
    if not cfg.bf16 and cfg.use_precision_aware_optimizer:
        raise BridgeError("--use-precision-aware-optimizer keeps fp32 master weights as 16-bit remainders of bf16 "
                          "parameters; add --bf16")


def _check_fp8(cfg: TrainConfig, model: ModelConfig) -> None:
    """--fp8: a known recipe and format, bf16 weights (FP8 casts from them), an FP8-capable GPU and torchao; bf16
    first/last layers that leave some layer in FP8."""
    if cfg.fp8 is None:
        if cfg.fp8_output_proj:
            raise BridgeError("--fp8-output-proj runs the output layer in FP8, but FP8 is off: add --fp8 tensorwise "
                              "(or rowwise), or drop --fp8-output-proj")
        if cfg.first_last_layers_bf16:
            raise BridgeError("--first-last-layers-bf16 keeps layers out of FP8, but FP8 is off: add --fp8 tensorwise "
                              "(or rowwise), or drop --first-last-layers-bf16")
        if cfg.fp8_format is not None:
            raise BridgeError(f"--fp8-format {cfg.fp8_format} picks FP8's gradient type, but FP8 is off: add --fp8 "
                              f"tensorwise")
        return
    check_fp8_recipe(cfg.fp8, cfg.fp8_format)
    if cfg.first_last_layers_bf16:
        _check_bf16_layers(cfg.num_layers_at_start_in_bf16, cfg.num_layers_at_end_in_bf16, model.num_layers)
    if not cfg.bf16:
        raise BridgeError("--fp8 casts bf16 weights and activations to FP8 for the matrix products: add --bf16")
    check_fp8_device(cfg.resolved_device())


def _check_bf16_layers(at_start: int, at_end: int, num_layers: int) -> None:
    """--num-layers-at-start/end-in-bf16: not negative, and some layer left in FP8."""
    if at_start < 0 or at_end < 0:
        raise BridgeError(f"--num-layers-at-start-in-bf16 {at_start} and --num-layers-at-end-in-bf16 {at_end} count "
                          f"layers: neither can be negative")
    if at_start + at_end >= num_layers:
        raise BridgeError(f"--num-layers-at-start-in-bf16 {at_start} + --num-layers-at-end-in-bf16 {at_end} keep all "
                          f"{num_layers} layers in bf16, so --fp8 would change nothing: lower them, or drop --fp8")


def _check_packing(cfg: TrainConfig) -> None:
    """Megatron-LM's packing flags act on the documents of a corpus."""
    flags = [f"--{name.replace('_', '-')}" for name in ("reset_attention_mask", "reset_position_ids", "eod_mask_loss")
             if getattr(cfg, name)]
    if flags and cfg.mock_data:
        raise BridgeError(f"{', '.join(flags)} act on the documents of a corpus; --mock-data has none: give --data")


def _check_context_parallel(cfg: TrainConfig, model: ModelConfig) -> None:
    """--cp: a positive degree, 2*cp equal chunks per sequence; the ring (p2p) only where no sliding window cuts the
    sequence; a2a only where every CP rank gets an equal share of the heads."""
    check_context_parallel(cfg.cp, cfg.cp_comm_type, model, cfg.tp)
    if cfg.cp == 1:
        return
    check_seq_length(cfg.seq_length, cfg.cp)
    window = min(model.windows, default=None)  # per layer for Gemma: the shortest cuts first
    if cfg.cp_comm_type == "p2p" and window is not None and cfg.seq_length > window:
        raise BridgeError(f"--cp-comm-type p2p (the ring) has no sliding window, and {model.architecture}'s window of "
                          f"{window} tokens is shorter than --seq-length {cfg.seq_length}: "
                          f"pass --cp-comm-type all_gather or a2a")
