"""Runs on each spawned rank: Megatron Core's own GPTModel (local spec) loads a bridge checkpoint, returns logits.

Megatron Core on CPU needs two patches (ARCHITECTURE.md): `torch.cuda.current_device` -> "cpu" and
`model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)`; `triton` must be importable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F


def _transformer_config(cfg, layout, config_class=None, **fields):  # noqa: ANN001, ANN003, ANN202
    """Megatron's TransformerConfig for a dense bridge config; `fields` add to (or replace) these, `config_class` is
    a TransformerConfig subclass (MLATransformerConfig)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return (config_class or TransformerConfig)(**{**dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups, kv_channels=cfg.kv_channels,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_epsilon, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=cfg.add_qkv_bias, qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp, params_dtype=torch.float32, use_cpu_initialization=True,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, sequence_parallel=False), **fields})


def full_logits(model, token_lists: Sequence[Sequence[int]], vocab_size: int) -> list[torch.Tensor]:  # noqa: ANN001
    """A loaded Megatron Core GPTModel's logits per prompt, gathered over TP and trimmed to the HF vocabulary.

    The causal mask is explicit: Megatron's default one is created on `cuda`.
    """
    from megatron.core import parallel_state

    from bridge.parallel.collectives import gather_from_tp

    model.eval()
    outs = []
    with torch.no_grad():
        for ids in token_lists:
            tokens, s = torch.tensor([list(ids)]), len(ids)
            pos = torch.arange(s).unsqueeze(0)
            mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)  # True = masked (Megatron)
            logits = model(tokens, pos, attention_mask=mask)  # [b, s, V_pad/tp]
            full = gather_from_tp(logits.contiguous(), parallel_state.get_tensor_model_parallel_group())
            outs.append(full[0, :, :vocab_size].float())
    return outs


def megatron_logits(checkpoints: Sequence[str], token_lists: Sequence[Sequence[int]]) -> list[list[torch.Tensor] | None]:
    """Per checkpoint (TP only, PP=1): full logits [s, V] per prompt on rank 0, None elsewhere."""
    torch.cuda.current_device = lambda: "cpu"  # Megatron Core asks for the device in many places
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from bridge.checkpoint import CheckpointMeta
    from bridge.converters.megatron_legacy import LegacyCheckpointReader

    results: list[list[torch.Tensor] | None] = []
    for ckpt in checkpoints:
        meta = CheckpointMeta.load(Path(ckpt))
        cfg, layout = meta.config, meta.layout
        assert layout.pp == 1 and meta.transformer_impl == "local"
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp)
        model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
        scaling = cfg.rope_scaling
        nope = [int(not cfg.layer(i).rope) for i in range(cfg.num_layers)]  # SmolLM3's NoPE layers: Megatron's list
        model = GPTModel(
            _transformer_config(cfg, layout, no_rope_freq=nope if any(nope) else None),
            get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm"),
            vocab_size=meta.padded_vocab_size, max_sequence_length=cfg.max_position_embeddings,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings, position_embedding_type="rope",
            rotary_percent=cfg.rotary_percent, rotary_base=int(cfg.rotary_base), rope_scaling=scaling is not None,
            rope_scaling_factor=scaling.factor if scaling else 8.0)
        state = LegacyCheckpointReader(Path(ckpt), layout).load_rank(parallel_state.get_tensor_model_parallel_rank(), 0)
        model.load_state_dict(state["model"], strict=True)
        outs = full_logits(model, token_lists, cfg.vocab_size)
        results.append(outs if dist.get_rank() == 0 else None)
    return results
