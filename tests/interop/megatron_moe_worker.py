"""Runs on each spawned rank: Megatron Core's own MoE GPTModel (local spec, SequentialMLP) loads a bridge MoE
checkpoint (its EP rank's file) and returns logits. The allgather dispatcher is used: the alltoall one creates a
torch.cuda.Stream.

Every MoE field bridge records maps onto one of Megatron's: the softmax router (pre-softmax or not), the sigmoid
router with expert bias, group-limited top-k and the top-k scaling factor, shared experts and their sigmoid gate,
dense layers between MoE ones (`moe_layer_freq` as a list). MLA models (DeepSeek-V3) get an MLATransformerConfig with
their YaRN RoPE. bridge writes MLA for the Transformer Engine spec only, which Megatron Core cannot build without
Transformer Engine, so an MLA file is loaded into the local MLA spec under MLA_TE_TO_LOCAL's names, strictly.

CPU patches as in megatron_worker.py, plus three for megatron-core 0.16.1 without Transformer Engine, none of which
touches the arithmetic: `moe_utils.te_general_gemm`, which the router reads, is never defined (set to None, the
PyTorch path); `multi_latent_attention.HAVE_TE` is True because its import of the TE extension succeeds with
MagicMock classes (set to False, as when that import fails); and the local MLA spec's DotProductAttention rejects the
`k_channels`/`v_channels` that MLASelfAttention passes it (NVIDIA/Megatron-LM#1589), so MLA layers get a subclass
that takes them (`_mla_core_attention`).
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from bridge.parallel.collectives import gather_from_tp
from tests.interop.megatron_worker import _transformer_config, full_logits

#: Where the TE MLA spec and the local MLA spec (megatron/core/models/gpt/gpt_layer_specs.py) name a weight
#: differently: the TE spec fuses the q/kv a-layernorms into the up-projections and a dense layer's pre-MLP norm into
#: linear_fc1; the local spec has separate q_layernorm, kv_layernorm and pre_mlp_layernorm modules. Layer-relative.
MLA_TE_TO_LOCAL: dict[str, str] = {
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
#: TE modules with `_extra_state` whose local counterparts (RMSNorm, DotProductAttention) have none.
_TE_ONLY_EXTRA = re.compile(r"\.(input_layernorm|pre_mlp_layernorm|self_attention\.core_attention)\._extra_state$")
_LAYER_KEY = re.compile(r"^(decoder\.layers\.\d+\.)(.*)$")
#: An MTP layer's transformer layer: `transformer_layer` in checkpoints (Megatron-Bridge's name, and the one Megatron
#: Core 0.19.2 maps its GPT MTP layers to in sharded checkpoints), `mtp_model_layer` as Megatron Core 0.19.2's module.
_MTP_LAYER = re.compile(r"^(mtp\.layers\.\d+\.)transformer_layer\.")


def _moe_fields(cfg) -> dict[str, Any]:  # noqa: ANN001
    """Megatron's MoE fields for bridge's MoEConfig."""
    moe = cfg.moe
    # Megatron's sigmoid router always divides the top-k scores by their sum (for top-k > 1).
    assert moe.score_function == "softmax" or moe.normalize_topk or moe.router_topk == 1, "unnormalised sigmoid top-k"
    return dict(
        num_moe_experts=moe.num_experts, moe_router_topk=moe.router_topk, moe_ffn_hidden_size=moe.moe_ffn_hidden_size,
        moe_layer_freq=[int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)], moe_router_pre_softmax=moe.pre_softmax,
        moe_router_score_function=moe.score_function, moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_topk_scaling_factor=moe.topk_scaling_factor, moe_router_num_groups=moe.num_groups,
        moe_router_group_topk=moe.group_topk, moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=moe.shared_expert_gate, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False, moe_router_dtype="fp32")


def _mla_fields(cfg) -> dict[str, Any]:  # noqa: ANN001
    """Megatron's MLATransformerConfig fields for bridge's MLAConfig (the a-layernorms are its `qk_layernorm`)."""
    mla = cfg.mla
    return dict(
        multi_latent_attention=True, q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank,
        qk_head_dim=mla.qk_head_dim, qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim, v_head_dim=mla.v_head_dim,
        qk_layernorm=True, rope_type=mla.rope_type, rotary_base=cfg.rotary_base,
        rotary_scaling_factor=mla.rotary_scaling_factor,
        original_max_position_embeddings=mla.original_max_position_embeddings, beta_fast=mla.beta_fast,
        beta_slow=mla.beta_slow, mscale=mla.mscale, mscale_all_dim=mla.mscale_all_dim)


def _moe_config(cfg, layout):  # noqa: ANN001, ANN202
    """The dense TransformerConfig plus the MoE fields; for MLA models an MLATransformerConfig with the MLA fields."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    fields = {**_moe_fields(cfg), "expert_model_parallel_size": layout.ep, **(_mla_fields(cfg) if cfg.mla else {})}
    fields.update(mtp_num_layers=cfg.mtp_layers or None)
    return _transformer_config(cfg, layout, MLATransformerConfig if cfg.mla else None, **fields)


def _mla_core_attention():  # noqa: ANN202
    """megatron-core 0.16.1's local DotProductAttention, taking the `k_channels`/`v_channels` that MLASelfAttention
    passes it (without them the local MLA spec fails to build: NVIDIA/Megatron-LM#1589). Its scores need no head
    width (MLA gives the softmax scale); its output is `v_channels` per head, not `kv_channels`."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args: Any, k_channels: int | None = None, v_channels: int | None = None,
                     **kwargs: Any) -> None:  # the Attention base class first builds one without them
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return MLADotProductAttention


def te_mla_to_local(state: dict[str, Any]) -> dict[str, Any]:
    """A TE-spec MLA rank state dict under the local MLA spec's names (MLA_TE_TO_LOCAL; TE-only extra states out)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if _TE_ONLY_EXTRA.search(key):
            continue
        m = _LAYER_KEY.match(key)
        if m:
            key = m.group(1) + MLA_TE_TO_LOCAL.get(m.group(2), m.group(2))
        out[key] = value
    return out


def megatron_moe_logits(checkpoints: Sequence[str], token_lists: Sequence[Sequence[int]],
                        mtp: bool = False) -> list[list[torch.Tensor] | None]:
    """Per checkpoint (EP and TP, PP=1): full logits [s, V] per prompt on rank 0, None elsewhere. `mtp`: the logits of
    the MTP layer instead, [s - 1, V] per prompt (position i predicts token i + 2; the last position, whose next token
    Megatron rolls in as padding, is cut)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    results: list[list[torch.Tensor] | None] = []
    for ckpt in checkpoints:
        model, cfg = _load_model(ckpt)
        captured: list[torch.Tensor] = []
        if mtp:  # the MTP layer's output (after its final_layernorm), through the shared output layer
            model.mtp.layers[0].register_forward_hook(lambda module, args, out: captured.append(out[0]))
        outs = full_logits(model, token_lists, cfg.vocab_size)
        if mtp:
            group = parallel_state.get_tensor_model_parallel_group()
            with torch.no_grad():
                outs = [gather_from_tp(model.output_layer(h)[0].contiguous(), group)[:-1, 0, :cfg.vocab_size].float()
                        for h in captured]
        results.append(outs if dist.get_rank() == 0 else None)
    return results


def _load_model(ckpt: str):  # noqa: ANN202 - (Megatron Core GPTModel, bridge ModelConfig)
    """Megatron Core's GPTModel (local spec; the MTP block where the config has MTP layers) for this rank, loaded
    strictly from its EP rank's file."""
    torch.cuda.current_device = lambda: "cpu"  # Megatron Core asks for the device in many places
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # 0.16.1 without TE leaves the name undefined (NameError)
        moe_utils.te_general_gemm = None
    if importlib.util.find_spec("transformer_engine") is None:  # TELinear is a MagicMock then, not a type
        from megatron.core.transformer import multi_latent_attention

        multi_latent_attention.HAVE_TE = False
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from bridge.checkpoint import CheckpointMeta
    from bridge.converters.megatron_legacy import LegacyCheckpointReader

    meta = CheckpointMeta.load(Path(ckpt))
    cfg, layout = meta.config, meta.layout
    assert layout.pp == 1 and not layout.moe_grouped_gemm
    assert meta.transformer_impl == ("transformer_engine" if cfg.mla else "local")
    assert layout.tp == 1 or not cfg.mla, "the local MLA spec splits the down-projections over TP"
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp, expert_model_parallel_size=layout.ep)
    model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    config = _moe_config(cfg, layout)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    if cfg.mla:
        for layer in spec.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = _mla_core_attention()
    mtp = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False) if cfg.mtp_layers else None
    model = GPTModel(config, spec, vocab_size=meta.padded_vocab_size, max_sequence_length=cfg.max_position_embeddings,
                     share_embeddings_and_output_weights=cfg.tie_word_embeddings, position_embedding_type="rope",
                     rotary_base=int(cfg.rotary_base), rotary_percent=cfg.rotary_percent, mtp_block_spec=mtp)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    state = LegacyCheckpointReader(Path(ckpt), layout).load_rank(parallel_state.get_tensor_model_parallel_rank(), 0,
                                                                  ep_rank)["model"]
    state = {_MTP_LAYER.sub(r"\1mtp_model_layer.", k): v for k, v in state.items()}
    model.load_state_dict(te_mla_to_local(state) if cfg.mla else state, strict=True)
    return model, cfg
