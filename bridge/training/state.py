"""Everything one rank trains with, set up once: model chunks, buffers, optimizer, schedule, data, position."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bridge.checkpoint import HF_META_DIR, CheckpointMeta
from bridge.config import megatron_args
from bridge.data.tokenizer import load_tokenizer
from bridge.errors import BridgeError, disk_space_checked
from bridge.nn.attention import set_attention_backend
from bridge.nn.moe import MoELayer
from bridge.nn.rope_qkv import set_rope_fusion
from bridge.parallel.state import ParallelState
from bridge.training import checkpointing as ckpt
from bridge.training.config import TrainConfig
from bridge.training.data import (Documents, MockDataset, PackedDataset, WholeDocumentDataset, split_documents,
                                  step_micro_batches)
from bridge.training.grads import ParamAndGradBuffer
from bridge.training.lora_run import lora_spec, write_lora
from bridge.training.lr import LRSchedule
from bridge.training.model import build_chunks, resume_state
from bridge.training.optimizer import AdamConfig, MixedPrecisionAdamW
from bridge.training.packing import PackingFlags
from bridge.training.plan import Plan
from bridge.training.resume import restore_optimizer
from bridge.training.rng import set_rng_state

log = logging.getLogger(__name__)


@dataclass
class RankSetup:
    cfg: TrainConfig
    plan: Plan
    ps: ParallelState
    device: torch.device
    chunks: list[Any]
    buffer: ParamAndGradBuffer
    optimizer: MixedPrecisionAdamW
    schedule: LRSchedule
    train: Any
    valid: Any
    iteration: int = 0
    consumed: int = 0
    loss_curve: list[list[float]] = field(default_factory=list)
    valid_curve: list[list[Any]] = field(default_factory=list)
    saved_at: int | None = None

    def micro_batches(self, dataset: Any, first: int) -> list[dict[str, torch.Tensor]]:
        return step_micro_batches(dataset, first, self.cfg.global_batch_size, self.cfg.micro_batch_size, self.plan.dp,
                                  self.ps.dp_rank, self.device, cp=self.ps.cp, cp_rank=self.ps.cp_rank,
                                  packing=PackingFlags(self.cfg.reset_attention_mask, self.cfg.reset_position_ids,
                                                       self.cfg.eod_mask_loss))

    def entries(self) -> dict[str, Any]:
        """Non-model checkpoint entries (plain values; the optimizer's state is added by the saver)."""
        layout = self.ps.layout
        base = megatron_args(self.plan.model, padded_vocab_size=layout.padded_vocab_size(self.plan.model.vocab_size),
                             tp=layout.tp, pp=layout.pp, vpp=layout.vpp, transformer_impl=self.plan.transformer_impl,
                             dtype="bf16" if self.cfg.bf16 else "fp32", divisible_by=layout.make_vocab_size_divisible_by,
                             ep=layout.ep, etp=layout.etp, moe_grouped_gemm=layout.moe_grouped_gemm)
        return {"args": ckpt.megatron_training_args(base, self.cfg, self.iteration),
                "opt_param_scheduler": {**self.schedule.state_dict(), "num_steps": self.iteration * self.cfg.global_batch_size},
                "train_state": {"iteration": self.iteration, "consumed_train_samples": self.consumed,
                                "seed": self.cfg.seed, "loss_curve": self.loss_curve, "valid_curve": self.valid_curve}}

    def summary(self) -> dict[str, Any]:
        """The run in plain JSON values: a loss that is not finite (the run diverged) is None, written as null (json
        would write NaN, which JSON parsers reject), and `loss_finite` says whether every loss was finite."""
        valid = [v for v in self.valid_curve if v[1] is not None]
        curve, valid_curve = _finite_curve(self.loss_curve), _finite_curve(valid)
        return {"iterations": self.iteration, "tokens": self.consumed * self.cfg.seq_length,
                "final_train_loss": curve[-1][1] if curve else None,
                "final_valid_loss": valid_curve[-1][1] if valid_curve else None,
                "loss_finite": all(math.isfinite(loss) for _, loss in self.loss_curve + valid),
                "loss_curve": curve, "valid_curve": valid_curve}


def _finite_curve(curve: list[list[Any]]) -> list[list[Any]]:
    """[iteration, loss] pairs with a loss that is not finite as None."""
    return [[it, loss if math.isfinite(loss) else None] for it, loss in curve]


def moe_layers(chunks: list[Any], *, aux_loss_scale: float | None = None) -> list[Any]:
    """This rank's MoE layers; sets their aux-loss gradient scale (the LM loss's 1/micro-batches per global batch)."""
    layers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, MoELayer)]
    if aux_loss_scale is not None:
        for layer in layers:
            layer.aux_loss_scale = aux_loss_scale
    return layers


def _hf_meta_folder(cfg: TrainConfig) -> Path | None:
    if cfg.load is not None:
        return Path(cfg.load) / HF_META_DIR
    path = Path(cfg.model_config)
    return path if path.is_dir() else path.parent


def _eod(cfg: TrainConfig, tokenizer: Any) -> int:
    folder = _hf_meta_folder(cfg)
    config = folder / "config.json" if folder else None
    if config is not None and config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        if isinstance(eos, list) and eos:
            eos = eos[0]
        if isinstance(eos, int):
            return eos
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        return int(tokenizer.eos_token_id)
    raise BridgeError("cannot tell the end-of-document token: the model config has no eos_token_id; add it to config.json")


def build_datasets(cfg: TrainConfig, plan: Plan) -> tuple[Any, Any]:
    """(train, valid or None): packed documents split by --split, or mock data."""
    if cfg.mock_data:
        return (MockDataset(plan.model.vocab_size, cfg.seq_length, cfg.seed),
                MockDataset(plan.model.vocab_size, cfg.seq_length, cfg.seed + 1))
    tokenizer = None
    if any(p.endswith(".jsonl") for p in cfg.data_path):
        if cfg.tokenizer:
            tokenizer = load_tokenizer(str(cfg.tokenizer))
        else:  # the checkpoint's own: named as --load was given, not as its automatic reshard
            given = Path(cfg.load_as_given) / HF_META_DIR if cfg.load_as_given else _hf_meta_folder(cfg)
            tokenizer = load_tokenizer(str(_hf_meta_folder(cfg)), name=str(given),
                                       advice="pass --tokenizer with the HF model folder or Hub id to tokenize the "
                                              ".jsonl data with")
    docs = Documents(cfg.data_path, text_key=cfg.text_key, tokenizer=tokenizer, use_loss_mask=cfg.sft,
                     vocab_size=plan.model.vocab_size)
    train_ids, valid_ids, _ = split_documents(len(docs), cfg.split)
    eod = _eod(cfg, tokenizer)
    packer = WholeDocumentDataset if cfg.sft else PackedDataset  # SFT: a conversation is never split
    train = packer(docs, train_ids, cfg.seq_length, cfg.seed, eod)
    valid = packer(docs, valid_ids, cfg.seq_length, cfg.seed + 1, eod) if valid_ids.size else None
    return train, valid


def grad_dtype(cfg: TrainConfig) -> torch.dtype:
    """The gradient buffer's dtype: fp32, also under --bf16 (Megatron-LM's rule), unless --grad-reduce-in-bf16."""
    return torch.bfloat16 if cfg.bf16 and cfg.grad_reduce_in_bf16 else torch.float32


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.resolved_device() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup_rank(cfg: TrainConfig, plan: Plan) -> RankSetup:
    """Build this rank's model, buffers and optimizer; load and resume from --load; open the data."""
    device = _device(cfg)
    if device.type == "cuda":
        set_attention_backend(cfg.attention_backend)  # before torch.compile fixes the kernel in its graphs
    set_rope_fusion(cfg.rope_fusion)
    ps = ParallelState(plan.layout, dist.get_world_size(), dist.get_rank(), cp=plan.cp, cp_comm_type=cfg.cp_comm_type)
    chunks, state = build_chunks(cfg, plan, ps, device)
    buffer = ParamAndGradBuffer(chunks, ps, param_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                grad_dtype=grad_dtype(cfg), bucket_size=cfg.ddp_bucket_size,
                                distributed=cfg.use_distributed_optimizer, sequence_parallel=cfg.sequence_parallel,
                                gradient_accumulation_fusion=cfg.gradient_accumulation_fusion)
    optimizer = MixedPrecisionAdamW(buffer, ps, AdamConfig(
        lr=cfg.lr, weight_decay=cfg.weight_decay, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2, eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, param_remainders=cfg.use_precision_aware_optimizer))
    schedule = LRSchedule(lr=cfg.lr, min_lr=cfg.min_lr, warmup_iters=cfg.lr_warmup_iters,
                          decay_iters=cfg.lr_decay_iters or cfg.train_iters, style=cfg.lr_decay_style)
    train, valid = build_datasets(cfg, plan)
    rs = RankSetup(cfg, plan, ps, device, chunks, buffer, optimizer, schedule, train, valid)
    moe_layers(chunks, aux_loss_scale=1.0 / plan.global_microbatches)
    resume = resume_state(state, cfg)
    if resume is not None:
        ts = resume["train_state"]
        restore_optimizer(optimizer, resume["optimizer"], Path(cfg.lora_resume or cfg.load), int(ts["iteration"]), ps, plan.model,
                          plan.transformer_impl)
        rs.iteration, rs.consumed = int(ts["iteration"]), int(ts["consumed_train_samples"])
        rs.loss_curve, rs.valid_curve = [list(x) for x in ts["loss_curve"]], [list(x) for x in ts["valid_curve"]]
        if resume["rng_state"] is not None:  # None: a torch_dist save of another layout (the seed stands)
            set_rng_state(resume["rng_state"])
        else:
            torch.manual_seed(cfg.seed + rs.iteration)
        rs.saved_at = rs.iteration
        log.info("resuming at iteration %d (%d samples consumed)", rs.iteration, rs.consumed)
    else:
        torch.manual_seed(cfg.seed)
    del state
    if cfg.save and ps.rank == 0:
        _prepare_save(cfg, plan, rs.iteration)
    return rs


def _prepare_save(cfg: TrainConfig, plan: Plan, start: int) -> None:
    save = Path(cfg.save)
    if save.is_dir():
        ckpt.remove_partial(save)
        later = [it for it in ckpt.iterations(save) if it > start]
        if later:
            log.warning("%s holds checkpoints past iteration %d, where this run starts (up to iteration %d): another "
                        "run's, left as they are; a save at one of their iterations replaces it", save, start, later[-1])
    source = {"trained_from": cfg.load_as_given or cfg.load or cfg.model_config}
    if plan.load_meta is not None:
        source = {**plan.load_meta.source, **source}
    meta = CheckpointMeta(config=plan.model, layout=plan.layout, transformer_impl=plan.transformer_impl,
                          dtype="bf16" if cfg.bf16 else "fp32", source=source, format=cfg.ckpt_format)
    with disk_space_checked(save, ckpt.NO_SPACE_ADVICE):
        ckpt.write_meta(save, meta, _hf_meta_folder(cfg))
        if cfg.lora_rank is not None:
            write_lora(save, lora_spec(cfg), cfg.load_as_given or cfg.load)
