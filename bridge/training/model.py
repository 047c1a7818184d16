"""Build one rank's model for training: chunks, weights (checkpoint or random init), recomputation, compile."""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from bridge.checkpoint import CheckpointMeta
from bridge.converters.torch_dist import TorchDistReader, open_rank_reader
from bridge.errors import BridgeError
from bridge.models import conversions
from bridge.nn import build_model_chunks, load_rank_checkpoint, sync_tied_embeddings
from bridge.nn.fp8 import apply_fp8, first_last_layers
from bridge.nn.lora import apply_lora, load_adapter_state
from bridge.nn.moe import MoELayer
from bridge.converters.megatron_legacy import LegacyCheckpointReader, model_keys
from bridge.parallel.state import ParallelState
from bridge.training.config import TrainConfig
from bridge.training.lora_run import lora_spec
from bridge.training.plan import Plan
from bridge.training.resume import dist_training_entries

log = logging.getLogger(__name__)


def build_chunks(cfg: TrainConfig, plan: Plan, ps: ParallelState, device: torch.device) -> tuple[list[nn.Module], dict[str, Any] | None]:
    """fp32 chunks with the checkpoint's (or seeded random) weights; returns the rank file's dict when loaded.

    Chunks are built in fp32 even for bf16 training: the optimizer takes its fp32 master weights from
    them before the parameter buffer casts to bf16, so nothing is lost from an fp32 checkpoint.
    """
    torch.manual_seed(cfg.seed + 1000 * ps.pp_rank + ps.tp_rank)  # random init: distinct shards per rank
    chunks = build_model_chunks(plan.model, ps, transformer_impl=plan.transformer_impl,
                                sequence_parallel=cfg.sequence_parallel, params_dtype=torch.float32, device=device,
                                mask_padded_vocab=True)
    state = None
    if cfg.load is not None:
        meta = CheckpointMeta.load(Path(cfg.load))
        reader = open_rank_reader(Path(cfg.load), meta, conversions(meta.config))  # torch or torch_dist
        where: dict[str, Any] = {"ep_rank": ps.ep_rank} if ps.ep > 1 else {}  # EP rank file: mp_rank_TT[_PPP]_EEE
        if isinstance(reader, TorchDistReader):
            where["layout"] = ps.layout  # torch_dist serves any layout: split for this run's
        state = reader.load_rank(ps.tp_rank, ps.pp_rank, **where)
        load_rank_checkpoint(chunks, state)
        if isinstance(reader, TorchDistReader):  # a torch_dist training save keeps its training state apart
            state.update(dist_training_entries(reader.folder, ps))
    elif ps.ep > 1:
        _distinct_expert_init(chunks, cfg.seed + 1000 * ps.pp_rank + ps.tp_rank, ps.ep_rank)
    sync_tied_embeddings(chunks)
    if cfg.lora_rank is not None:
        state = add_adapters(chunks, cfg, ps)
    if cfg.fp8:  # FP8 compute only: parameters, state dicts and checkpoints are unchanged
        bf16 = (first_last_layers(plan.model.num_layers, cfg.num_layers_at_start_in_bf16,
                                  cfg.num_layers_at_end_in_bf16) if cfg.first_last_layers_bf16 else ())
        apply_fp8(chunks, cfg.fp8, cfg.fp8_format, output_proj=cfg.fp8_output_proj, bf16_layers=bf16)
    if cfg.recompute:
        apply_recompute(chunks, cfg.recompute)
    if cfg.compile:
        compile_chunks(chunks)
    return chunks, state


def add_adapters(chunks: Sequence[nn.Module], cfg: TrainConfig, ps: ParallelState) -> dict[str, Any] | None:
    """Freeze the loaded base, add the adapters, keep the base in the training dtype (it has no fp32 master to
    come from); a resumed LoRA run's adapter comes from its own rank file, whose training entries are returned."""
    apply_lora(chunks, lora_spec(cfg))
    if cfg.bf16:
        for chunk in chunks:
            for p in chunk.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
    if cfg.lora_resume is None:
        return None
    meta = CheckpointMeta.load(Path(cfg.lora_resume))
    state = LegacyCheckpointReader(Path(cfg.lora_resume), meta.layout).load_rank(
        ps.tp_rank, ps.pp_rank, ps.ep_rank if ps.ep > 1 else 0)
    load_adapter_state(chunks, [state[k] for k in model_keys(meta.layout)])
    return state


def compile_chunks(chunks: Sequence[nn.Module]) -> None:
    """torch.compile every transformer layer, and the output layer where it runs in FP8: eager, the FP8 casts of its
    [tokens, vocabulary] gradient take about six passes over it, compiled two (an abs-max and a cast)."""
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            layer.compile()
        if chunk.output_layer is not None and chunk.output_layer.fp8 is not None:
            chunk.output_layer.compile()


def _distinct_expert_init(chunks: Sequence[nn.Module], seed: int, ep_rank: int) -> None:
    """Random init at EP: the per-(pp, tp) seed gives every EP rank the same draws, i.e. copies of the same
    experts; redraw the expert weights from a seed of their own so each EP rank starts with different experts."""
    generator = torch.Generator().manual_seed(seed * 7919 + ep_rank + 1)
    with torch.no_grad():
        for chunk in chunks:
            for param in chunk.parameters():
                if not getattr(param, "allreduce", True):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


#: Besides pointwise ops and views, what `--recompute elementwise` runs again in backward: copies, concatenation,
#: the norms' mean and the fused RoPE kernel, each one pass over memory. Everything else keeps its output: matmuls,
#: attention, communication, routing.
_RECOMPUTED_OPS = {"aten::_to_copy", "aten::clone", "aten::cat", "aten::mean", "aten::_unsafe_view", "bridge::rope_qkv"}


def _elementwise_recomputed(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective-checkpoint policy: recompute what is cheap to redo, save what a matmul or attention produced."""
    cheap = (torch.Tag.pointwise in getattr(op, "tags", ()) or getattr(op, "is_view", False)
             or getattr(op, "name", lambda: "")().split(".")[0] in _RECOMPUTED_OPS)  # the op, any overload
    return CheckpointPolicy.PREFER_RECOMPUTE if cheap else CheckpointPolicy.MUST_SAVE


def _checkpointed(forward: Any, *args: Any) -> torch.Tensor:
    return checkpoint(forward, *args, use_reentrant=False)


def _elementwise_checkpointed(forward: Any, *args: Any) -> torch.Tensor:
    return checkpoint(forward, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _elementwise_recomputed))


def apply_recompute(chunks: Sequence[nn.Module], granularity: str) -> None:
    """full: recompute every transformer layer in backward; selective: only core attention (Megatron's split);
    elementwise: keep what each layer's matmuls and attention produce and recompute the rest (norms, activation
    functions, RoPE, residual sums), bridge's own level: about a third less activation memory for elementwise
    kernels run again, which torch.compile fuses into the backward's. In MoE layers only the attention block: the
    experts' dispatch fills buffers in place, which a selective checkpoint cannot keep.

    The wrapper replaces the instance's `forward`, so module names (and the checkpoint) are unchanged.
    """
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            if granularity == "elementwise":
                target = layer.self_attention if isinstance(layer.mlp, MoELayer) else layer
                target.forward = functools.partial(_elementwise_checkpointed, target.forward)
            else:
                target = layer if granularity == "full" else layer.self_attention.core_attention
                target.forward = functools.partial(_checkpointed, target.forward)


def resume_state(state: dict[str, Any] | None, cfg: TrainConfig) -> dict[str, Any] | None:
    """The rank file's training entries when `--load` is a training checkpoint to resume, else None."""
    if state is None or "optimizer" not in state or cfg.finetune:
        return None
    if state["optimizer"] is None:
        raise BridgeError(f"{cfg.load} has an empty optimizer entry; pass --finetune to start a fresh optimizer")
    return state
