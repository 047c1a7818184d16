"""Runs on each spawned rank: Megatron Core's own MoE GPTModel (local spec, SequentialMLP) loads a bridge MoE
checkpoint (its EP rank's file) and returns logits. CPU patches as in megatron_worker.py, plus one: without
Transformer Engine megatron-core 0.16.1 never defines `moe_utils.te_general_gemm`, which the router reads; it is set
to None (the PyTorch path). The allgather dispatcher is used: the alltoall one creates a torch.cuda.Stream."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from tests.interop.megatron_worker import _transformer_config, full_logits


def _moe_config(cfg, layout):  # noqa: ANN001, ANN202
    """The dense TransformerConfig plus Megatron's MoE fields for a softmax top-k router (Mixtral, Qwen3-MoE)."""
    import dataclasses

    moe = cfg.moe
    assert moe.score_function == "softmax" and not moe.shared_expert_ffn_hidden_size, "softmax routers only"
    base = _transformer_config(cfg, layout)
    return dataclasses.replace(
        base, num_moe_experts=moe.num_experts, moe_router_topk=moe.router_topk, moe_ffn_hidden_size=moe.moe_ffn_hidden_size,
        moe_layer_freq=[int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)], moe_router_pre_softmax=moe.pre_softmax,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False, expert_model_parallel_size=layout.ep, moe_router_dtype="fp32")


def megatron_moe_logits(checkpoints: Sequence[str], token_lists: Sequence[Sequence[int]]) -> list[list[torch.Tensor] | None]:
    """Per checkpoint (EP and TP, PP=1): full logits [s, V] per prompt on rank 0, None elsewhere."""
    torch.cuda.current_device = lambda: "cpu"  # Megatron Core asks for the device in many places
    import torch.distributed as dist
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # 0.16.1 without TE leaves the name undefined (NameError)
        moe_utils.te_general_gemm = None
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from bridge.checkpoint import CheckpointMeta
    from bridge.converters.megatron_legacy import LegacyCheckpointReader

    results: list[list[torch.Tensor] | None] = []
    for ckpt in checkpoints:
        meta = CheckpointMeta.load(Path(ckpt))
        cfg, layout = meta.config, meta.layout
        assert layout.pp == 1 and meta.transformer_impl == "local" and not layout.moe_grouped_gemm
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp, expert_model_parallel_size=layout.ep)
        model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
        config = _moe_config(cfg, layout)
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
        model = GPTModel(config, spec, vocab_size=meta.padded_vocab_size, max_sequence_length=cfg.max_position_embeddings,
                         share_embeddings_and_output_weights=cfg.tie_word_embeddings, position_embedding_type="rope",
                         rotary_base=int(cfg.rotary_base))
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        state = LegacyCheckpointReader(Path(ckpt), layout).load_rank(parallel_state.get_tensor_model_parallel_rank(), 0,
                                                                      ep_rank)
        model.load_state_dict(state["model"], strict=True)
        outs = full_logits(model, token_lists, cfg.vocab_size)
        results.append(outs if dist.get_rank() == 0 else None)
    return results
