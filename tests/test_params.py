"""The one declaration of Megatron parameter kinds (bridge.params) against the model that bridge.nn builds: every
tensor of a rank's state dict is a declared kind, sharded as its kind says, and the TE `_extra_state` entries are
exactly those the declaration derives. Ranks are built on `meta` (no memory, no torch.distributed)."""
from __future__ import annotations

import pytest
import torch

from bridge.layout import ParallelLayout
from bridge.models import family
from bridge.nn import build_model_chunks
from bridge.params import KINDS, LOCAL_NAMES, Partial, Split, kind_of
from bridge.parallel.state import ParallelState
from bridge.sharding import extra_state_keys, split
from bridge.tiny import tiny_config
from tests.model_fixtures import MODEL_OVERRIDES, real_config

#: One model per block shape: qkv bias, q/k norm, a gated shared expert, MLA with a router bias and a dense layer,
#: pre+post norms with per-head q/k norms (Gemma 3), post-norms only with full-width q/k norms (OLMo 2), qkv bias with
#: a router bias and an ungated shared expert (GLM-4.5), sinks with linear and expert biases (GPT-OSS).
MODELS = ("qwen2", "qwen3", "qwen2-moe", "deepseek-v3", "gemma3", "olmo2", "glm4.5-air", "gpt-oss")


def _rank_state(name: str, impl: str, tp_rank: int) -> tuple[object, ParallelLayout, dict[str, torch.Tensor]]:
    hf = tiny_config(real_config(name), **MODEL_OVERRIDES.get(name, {}))
    cfg = family(hf.architectures[0]).config_from_hf(hf)
    layout = ParallelLayout(tp=2)
    chunks = build_model_chunks(cfg, ParallelState(layout, 2, tp_rank, create_groups=False), transformer_impl=impl,
                                device="meta")
    return cfg, layout, chunks[0].state_dict(keep_vars=True)


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
@pytest.mark.parametrize("name", MODELS)
def test_every_tensor_of_a_rank_is_a_declared_kind_with_its_shard_shape(name: str, impl: str) -> None:
    for tp_rank in range(2):
        cfg, layout, state = _rank_state(name, impl, tp_rank)
        padded = layout.padded_vocab_size(cfg.vocab_size)
        for key, tensor in state.items():
            if key.endswith("_extra_state"):
                continue
            kind = kind_of(key)
            whole = torch.empty(kind.shape(cfg), device="meta")  # an expert kind's shape is one expert's
            assert tensor.shape == split(whole, kind.split, 2, padded)[tp_rank].shape, key


@pytest.mark.parametrize("name", MODELS)
def test_te_extra_state_entries_are_the_declared_ones(name: str) -> None:
    cfg, layout, state = _rank_state(name, "transformer_engine", 0)
    modules = {key.rsplit(".", 1)[0] for key in state if not key.endswith("_extra_state")}
    declared = {k for module in modules for k in extra_state_keys(module, layout, cfg.num_experts)}
    assert declared == {key for key in state if key.endswith("_extra_state")}


def test_local_spec_names_agree_with_the_kinds_they_share_a_name_with() -> None:
    """`input_layernorm.weight` is both the local spec's pre-attention norm and the TE spec's TENorm (MLA layers):
    one key, so one split and one gradient rule."""
    for te_name, local in LOCAL_NAMES.items():
        te, other = KINDS[te_name], kind_of(f"decoder.layers.0.{local}")
        assert (te.split, te.partial) == (other.split, other.partial), (te_name, local)


#: How Megatron-Bridge's mappings split over TP (param_mapping.py): its AutoMapping reads the type from the module.
MEGATRON_BRIDGE_SPLITS = {
    "AutoMapping (column)": {Split.COLUMN, Split.VOCAB}, "AutoMapping (row)": {Split.ROW},
    "AutoMapping (replicated)": {Split.REPLICATED}, "QKVMapping": {Split.COLUMN}, "GatedMLPMapping": {Split.GATED_COLUMN},
}


def test_every_kind_splits_as_megatron_bridge_does_and_only_replicated_ones_are_partial() -> None:
    for kind in KINDS.values():
        assert kind.split in MEGATRON_BRIDGE_SPLITS[kind.megatron_bridge], kind.name
        assert kind.partial is Partial.NO or kind.split is Split.REPLICATED, kind.name


def test_an_undeclared_parameter_is_named_in_the_error() -> None:
    from bridge.errors import BridgeError

    with pytest.raises(BridgeError, match=r"decoder\.layers\.0\.mlp\.linear_fc3\.weight is not a Megatron parameter"):
        kind_of("decoder.layers.0.mlp.linear_fc3.weight")


def test_mtp_layer_keys_are_their_layer_kinds_or_the_mtp_kinds() -> None:
    """An MTP layer's transformer layer holds the decoder layer's kinds; its own modules are the `mtp.` kinds."""
    assert kind_of("mtp.layers.0.transformer_layer.mlp.experts.linear_fc1.weight3") is KINDS["mlp.experts.linear_fc1.weight"]
    assert kind_of("mtp.layers.1.transformer_layer.self_attention.linear_qkv.bias") is KINDS["self_attention.linear_qkv.bias"]
    assert kind_of("mtp.layers.0.eh_proj.weight").split is Split.COLUMN
    assert kind_of("mtp.layers.0.final_layernorm.weight") is not KINDS["decoder.final_layernorm.weight"]
