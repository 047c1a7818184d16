"""ParallelLayout: validation, Megatron's placement of layers on stages and virtual chunks, vocab padding."""
import pytest

from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout


def model(**changes: int) -> ModelConfig:
    base = dict(architecture="LlamaForCausalLM", num_layers=8, hidden_size=64, ffn_hidden_size=128,
                num_attention_heads=8, num_query_groups=4, kv_channels=8, vocab_size=300, max_position_embeddings=64)
    return ModelConfig(**{**base, **changes})


def test_virtual_pipeline_placement_matches_megatron_example() -> None:
    layout = ParallelLayout(pp=2, vpp=2)  # reference: L=8, PP=2, VP=2 -> stage 0 holds [0,1] and [4,5]
    assert list(layout.chunk_layers(0, 0, 8)) == [0, 1]
    assert list(layout.chunk_layers(0, 1, 8)) == [4, 5]
    assert list(layout.chunk_layers(1, 0, 8)) == [2, 3]
    assert list(layout.chunk_layers(1, 1, 8)) == [6, 7]
    place = layout.place(5, 8)
    assert (place.pp_rank, place.chunk, place.local_index) == (0, 1, 1)
    for layer in range(8):
        p = layout.place(layer, 8)
        assert layout.global_layer(p.pp_rank, p.chunk, p.local_index, 8) == layer


def test_plain_pipeline_is_consecutive() -> None:
    layout = ParallelLayout(pp=2)
    assert [layout.place(i, 8).pp_rank for i in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [layout.place(i, 8).local_index for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("vocab,tp,padded", [(300, 1, 384), (300, 2, 512), (128256, 4, 128512), (32000, 1, 32000), (151936, 2, 152064)])
def test_vocab_padding(vocab: int, tp: int, padded: int) -> None:
    assert ParallelLayout(tp=tp).padded_vocab_size(vocab) == padded


def test_rank_dir_names_pp_suffix_only_with_pipeline() -> None:
    assert ParallelLayout(tp=4).rank_dir(3, 0) == "mp_rank_03"
    assert ParallelLayout(tp=2, pp=2).rank_dir(1, 1) == "mp_rank_01_001"


@pytest.mark.parametrize("layout,changes,needle", [
    (ParallelLayout(tp=3), {}, "num_attention_heads"),
    (ParallelLayout(tp=8), {}, "num_key_value_heads"),
    (ParallelLayout(tp=2), {"ffn_hidden_size": 129}, "intermediate_size"),
    (ParallelLayout(pp=3), {}, "num_hidden_layers"),
    (ParallelLayout(pp=2, vpp=3), {}, "num_hidden_layers"),
])
def test_indivisible_layouts_are_refused(layout: ParallelLayout, changes: dict, needle: str) -> None:
    with pytest.raises(BridgeError, match=needle):
        layout.validate(model(**changes))


def test_vpp_without_pipeline_is_refused() -> None:
    with pytest.raises(BridgeError, match="--vpp needs --pp"):
        ParallelLayout(vpp=2)
