"""Runs on each spawned rank: Megatron Core writes the checkpoints today's Megatron stack leaves, for bridge to read.

Each plan builds Megatron Core's GPTModel (local spec, TP = the world size) with the vocabulary rows the plan asks
for (unpadded as Megatron-Bridge keeps it, or padded), fills it from a bridge `torch_dist` folder with
`dist_checkpointing.load` (Megatron loads the overlapping rows of a differently padded embedding), returns its
logits, and saves it again with `dist_checkpointing.save` under the plan's common state (Megatron-LM's with `args`,
or Megatron-Bridge's without). Megatron Core 0.19 stores that common state inside the DCP files; with an older
Megatron Core the same `common_state` ShardedObject 0.19 adds is passed to its own `save`, and the `common.pt` it
also writes is removed, so the folder has 0.19's layout either way.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

#: Megatron Core's version from which the common state lives inside the distributed checkpoint.
DCP_COMMON_STATE = (0, 19)


def core_version() -> tuple[int, int]:
    import megatron.core

    major, minor = megatron.core.__version__.split(".")[:2]
    return int(major), int(minor)


def _model(meta, tp: int, rows: int):  # noqa: ANN001, ANN202
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from bridge.layout import ParallelLayout
    from tests.interop.megatron_worker import _transformer_config

    cfg = meta.config
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    scaling = cfg.rope_scaling
    return GPTModel(
        _transformer_config(cfg, ParallelLayout(tp=tp)),
        get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm"),
        vocab_size=rows, max_sequence_length=cfg.max_position_embeddings,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings, position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base), rope_scaling=scaling is not None,
        rope_scaling_factor=scaling.factor if scaling else 8.0)


def _save(model, common: dict[str, Any], out: Path) -> None:  # noqa: ANN001
    """Megatron Core's own save of `{"model": ...}` plus `common`, in Megatron Core 0.19's layout."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if dist.get_rank() == 0:
        out.mkdir(parents=True)
    dist.barrier()
    state: dict[str, Any] = {"model": model.sharded_state_dict()}
    if core_version() >= DCP_COMMON_STATE:
        dist_checkpointing.save({**state, **common}, str(out))
    else:  # what 0.19's save adds (serialization.py), through this version's own ShardedObject writer
        state["common_state"] = ShardedObject("common_state", common, (1,), (0,), replica_id=dist.get_rank())
        dist_checkpointing.save(state, str(out))
        if dist.get_rank() == 0:
            (out / "common.pt").unlink()
            (out / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    dist.barrier()


def resave(plans: Sequence[dict[str, Any]], token_lists: Sequence[Sequence[int]]) -> list[list[torch.Tensor] | None]:
    """Per plan {"ckpt", "rows", "out", "common"}: logits on rank 0 (None elsewhere) of Megatron's model loaded from
    the bridge folder `ckpt`; the model is then saved to `out` with `common` as the common state."""
    from tests.interop.megatron_dist_worker import _logits, _patch_cpu

    _patch_cpu()
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from bridge.checkpoint import CheckpointMeta
    from bridge.converters.megatron_legacy import iteration_dir_name, read_tracker

    results: list[list[torch.Tensor] | None] = []
    for plan in plans:
        meta = CheckpointMeta.load(Path(plan["ckpt"]))
        model = _model(meta, dist.get_world_size(), plan["rows"])
        folder = Path(plan["ckpt"]) / iteration_dir_name(read_tracker(Path(plan["ckpt"])))
        state, _, absent = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder),
                                                   strict=StrictHandling.RETURN_ALL)
        assert not absent, f"{folder} lacks keys of Megatron's model: {sorted(absent)[:4]}"
        model.load_state_dict(state["model"], strict=True)
        model.eval()
        outs = _logits(model, meta.config.vocab_size, token_lists)
        results.append(outs if dist.get_rank() == 0 else None)
        _save(model, plan["common"], Path(plan["out"]))
    return results


def load_messages(folders: Sequence[str]) -> list[dict[str, Any]]:
    """Megatron Core's `dist_checkpointing.load` of each bridge folder (strict about the model): what it logged at
    WARNING or above, and the common state it returned."""
    from tests.interop.megatron_dist_worker import _patch_cpu

    _patch_cpu()
    import torch.distributed as dist  # noqa: F401 - the launched rank's process group
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from bridge.checkpoint import CheckpointMeta
    from bridge.converters.megatron_legacy import iteration_dir_name, read_tracker

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    found = []
    for root in map(Path, folders):
        meta = CheckpointMeta.load(root)
        model = _model(meta, 1, meta.padded_vocab_size)
        handler = Collect()
        logging.getLogger("megatron").addHandler(handler)
        try:
            state, _, absent = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                                       str(root / iteration_dir_name(read_tracker(root))),
                                                       strict=StrictHandling.RETURN_ALL)
        finally:
            logging.getLogger("megatron").removeHandler(handler)
        assert not absent, f"{root} lacks keys of Megatron's model: {sorted(absent)[:4]}"
        found.append({"messages": handler.messages, "args": vars(state["args"]) if "args" in state else {},
                      "iteration": state.get("iteration"), "checkpoint_version": state.get("checkpoint_version")})
    return found
