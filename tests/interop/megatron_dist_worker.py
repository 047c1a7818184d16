"""Runs on each spawned rank: Megatron Core's own `dist_checkpointing` loads a bridge torch_dist folder.

The run's TP is the world size, whatever layout the folder was written with: torch_dist is
layout-independent (Megatron reshards on load). The folder is the tracked iteration (`release` for an import).
Loading is strict about the model: every key Megatron's model asks for is there (`_extra_state` included) and
every other key of the folder is training state (`optimizer.*`, `rng_state/*`; an import has none).
Optionally the loaded model is saved again with Megatron Core's own `dist_checkpointing.save`, for bridge to
read back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

#: What a training checkpoint holds besides the model: the optimizer state and the per-rank RNG blobs.
TRAINING_STATE = ("optimizer.", "rng_state")
#: Megatron Core 0.19's common state inside the DCP files (bridge writes it; 0.19 leaves it out of the key check).
COMMON_STATE = "common_state"


def _patch_cpu() -> None:
    """Megatron Core asks CUDA for the device and synchronises before writing; on CPU both are no-ops."""
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _build(meta, tp: int):  # noqa: ANN001, ANN202
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from bridge.layout import ParallelLayout
    from tests.interop.megatron_worker import _transformer_config

    cfg, layout = meta.config, ParallelLayout(tp=tp)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    scaling = cfg.rope_scaling
    return GPTModel(
        _transformer_config(cfg, layout), get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm"),
        vocab_size=layout.padded_vocab_size(cfg.vocab_size), max_sequence_length=cfg.max_position_embeddings,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings, position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base), rope_scaling=scaling is not None,
        rope_scaling_factor=scaling.factor if scaling else 8.0)


def _logits(model, vocab: int, token_lists: Sequence[Sequence[int]]) -> list[torch.Tensor]:  # noqa: ANN001
    from megatron.core import parallel_state

    from bridge.parallel.collectives import gather_from_tp

    outs = []
    with torch.no_grad():
        for ids in token_lists:
            s = len(ids)
            mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)  # True = masked (Megatron)
            logits = model(torch.tensor([list(ids)]), torch.arange(s).unsqueeze(0), attention_mask=mask)  # [b, s, V_pad/tp]
            full = gather_from_tp(logits.contiguous(), parallel_state.get_tensor_model_parallel_group())
            outs.append(full[0, :, :vocab].float())
    return outs


def dist_logits(checkpoints: Sequence[str], token_lists: Sequence[Sequence[int]],
                save_dirs: Sequence[str] | None = None) -> list[list[torch.Tensor] | None]:
    """Per bridge torch_dist checkpoint: logits on rank 0 (None elsewhere); optionally re-save with Megatron."""
    _patch_cpu()
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from bridge.checkpoint import CheckpointMeta
    from bridge.converters.megatron_legacy import iteration_dir_name, read_tracker

    results: list[list[torch.Tensor] | None] = []
    for i, ckpt in enumerate(checkpoints):
        meta = CheckpointMeta.load(Path(ckpt))
        model = _build(meta, dist.get_world_size())
        folder = Path(ckpt) / iteration_dir_name(read_tracker(Path(ckpt)))
        # Megatron-LM's layout: the model under "model", common state (args, iteration, ...) beside it
        state, in_file_only, absent = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder),
                                                              strict=StrictHandling.RETURN_ALL)
        assert not absent, f"{folder} lacks keys of Megatron's model: {sorted(absent)[:4]}"
        training = "train_state" in state
        others = sorted(k for k in in_file_only if not (training and k.startswith(TRAINING_STATE))
                        and k.split("/")[0] != COMMON_STATE)
        assert not others, f"{folder} holds keys that are neither Megatron's model nor training state: {others[:4]}"
        assert not training or all(any(k.startswith(p) for k in in_file_only) for p in TRAINING_STATE)
        assert state["checkpoint_version"] == 3.0, state["checkpoint_version"]
        assert state["args"].ckpt_format == "torch_dist", f"{folder}: args.ckpt_format {state['args'].ckpt_format!r}"
        model.load_state_dict(state["model"], strict=True)
        model.eval()
        outs = _logits(model, meta.config.vocab_size, token_lists)
        results.append(outs if dist.get_rank() == 0 else None)
        if save_dirs:
            if dist.get_rank() == 0:
                Path(save_dirs[i]).mkdir(parents=True)
            dist.barrier()
            dist_checkpointing.save({"model": model.sharded_state_dict(), "checkpoint_version": 3.0}, save_dirs[i])
            dist.barrier()
    return results


def training_logits(dist_ckpt: str, legacy_ckpt: str,
                    token_lists: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Megatron Core's logits of a torch_dist training checkpoint (its `dist_checkpointing.load`) and of a legacy one
    (its GPTModel loading `model_optim_rng.pt`'s `model`, as Megatron-LM does) on rank 0; None elsewhere."""
    from tests.interop.megatron_worker import megatron_logits

    (dist_out,) = dist_logits([dist_ckpt], token_lists)
    (legacy_out,) = megatron_logits([legacy_ckpt], token_lists)
    return None if dist_out is None else (dist_out, legacy_out)
