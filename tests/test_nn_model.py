"""bridge.nn.GPTModel: state-dict names/shapes equal every rank file's, strict loading, and TP=1 parity with HF."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bridge.api import import_hf
from bridge.checkpoint import CheckpointMeta
from bridge.converters.megatron_legacy import LegacyCheckpointReader
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from bridge.nn import build_model_chunks, load_rank_checkpoint
from bridge.parallel.state import ParallelState
from tests.model_fixtures import CONFIGS, PARITY_LAYOUTS, PARITY_MODELS

LAYOUTS = PARITY_LAYOUTS


@pytest.fixture(scope="module")
def hf_models(tiny_hf) -> dict[str, Path]:
    return {k: tiny_hf(v) for k, v in PARITY_MODELS.items()}


def _chunks(ckpt: Path, tp_rank: int, pp_rank: int, **kwargs):  # noqa: ANN202
    meta = CheckpointMeta.load(ckpt)
    ps = ParallelState(meta.layout, meta.layout.tp * meta.layout.pp, pp_rank * meta.layout.tp + tp_rank,
                       create_groups=False)
    return meta, build_model_chunks(meta.config, ps, transformer_impl=meta.transformer_impl, **kwargs)


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_state_dict_is_exactly_each_rank_file(hf_models: dict[str, Path], tmp_path: Path, layout: ParallelLayout,
                                               impl: str) -> None:
    """Every rank's chunks have the same keys, shapes and dtypes as its `model`/`model{v}` entries."""
    for arch in ("llama-tied", "qwen2", "qwen3"):
        ckpt = import_hf(hf_models[arch], tmp_path / arch, layout, transformer_impl=impl)
        reader = LegacyCheckpointReader(ckpt, layout)
        for tp_rank, pp_rank in layout.ranks():
            _, chunks = _chunks(ckpt, tp_rank, pp_rank)
            state = reader.state(tp_rank, pp_rank)
            keys = ["model"] if layout.vpp is None else [f"model{v}" for v in range(layout.chunks)]
            for model, key in zip(chunks, keys, strict=True):
                ours = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
                theirs = {k: (tuple(v.shape), v.dtype) for k, v in state[key].items()}
                assert ours == theirs, f"{arch} {layout.name} tp{tp_rank} pp{pp_rank} {key}"


def test_te_extra_state_round_trips_empty_uint8(hf_models: dict[str, Path], tmp_path: Path) -> None:
    ckpt = import_hf(hf_models["qwen3"], tmp_path / "q", ParallelLayout())
    _, (model,) = _chunks(ckpt, 0, 0)
    extra = {k: v for k, v in model.state_dict().items() if k.endswith("_extra_state")}
    assert len(extra) == 5 * 4  # qkv, core_attention, proj, fc1, fc2 per layer x 4 layers
    assert all(v.dtype == torch.uint8 and v.numel() == 0 for v in extra.values())
    state = dict(model.state_dict())
    state.update({k: None for k in extra})  # an older TE writes None / BytesIO: still a strict load
    model.load_state_dict(state, strict=True)


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_tp1_logits_and_loss_are_bit_exact_with_transformers(hf_models: dict[str, Path], tmp_path: Path, impl: str) -> None:
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(0))
    for arch, hf in hf_models.items():
        ckpt = import_hf(hf, tmp_path / arch, ParallelLayout(), transformer_impl=impl)
        meta, chunks = _chunks(ckpt, 0, 0, mask_padded_vocab=True)
        load_rank_checkpoint(chunks, LegacyCheckpointReader(ckpt, meta.layout).load_rank(0, 0))
        with torch.no_grad():
            ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(tokens).logits  # [b, s, V]
            logits = chunks[0](tokens)  # [s, b, V_pad]
            loss = chunks[0](tokens[:, :-1], labels=tokens[:, 1:])  # [b, s-1]
        assert logits.shape == (19, 2, meta.padded_vocab_size)
        assert torch.equal(logits.transpose(0, 1)[..., :300], ref), arch
        ref_loss = F.cross_entropy(ref[:, :-1].reshape(-1, 300), tokens[:, 1:].reshape(-1), reduction="none")
        torch.testing.assert_close(loss.reshape(-1), ref_loss, rtol=0, atol=2e-6)


def test_loading_the_wrong_spec_names_missing_and_unexpected(hf_models: dict[str, Path], tmp_path: Path) -> None:
    ckpt = import_hf(hf_models["llama-untied"], tmp_path / "l", ParallelLayout(), transformer_impl="local")
    meta = CheckpointMeta.load(ckpt)
    chunks = build_model_chunks(meta.config, ParallelState(meta.layout, 1, 0), transformer_impl="transformer_engine")
    with pytest.raises(BridgeError, match=r"missing \[.*layer_norm_weight.*unexpected \[.*input_layernorm"):
        load_rank_checkpoint(chunks, LegacyCheckpointReader(ckpt, meta.layout).load_rank(0, 0))


def test_full_size_llama_shapes_on_meta_device() -> None:
    """A Llama-3.1-70B rank at TP=8 PP=4 VPP=2 builds on `meta` without allocating, with Megatron's shard shapes."""
    from transformers import AutoConfig

    from bridge.models import family

    hf = AutoConfig.from_pretrained(CONFIGS / "meta-llama--Llama-3.1-70B")
    cfg = family("LlamaForCausalLM").config_from_hf(hf)
    layout = ParallelLayout(tp=8, pp=4, vpp=2)
    ps = ParallelState(layout, 32, 31, create_groups=False)  # tp 7, last stage
    chunks = build_model_chunks(cfg, ps, device="meta")
    state = chunks[1].state_dict()
    assert state["output_layer.weight"].shape == (129024 // 8, 8192)  # 128256 padded to a multiple of 128 * 8
    assert state["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((64 + 2 * 8) * 128 // 8, 8192)
    assert state["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 28672 // 8, 8192)
    assert len(chunks[0].decoder.layers) == 80 // 8 and list(chunks[1].layer_numbers) == list(range(70, 80))


def test_attention_backend_choice_is_replaceable_and_keeps_the_maths() -> None:
    """--attention-backend sets a process-wide SDPA kernel order; choosing again replaces the earlier choice."""
    import torch.nn.functional as F

    from bridge.nn.attention import set_attention_backend

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8 ** 0.5
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected = scores.softmax(-1) @ v.repeat_interleave(2, 1)
    try:
        for name in ("unfused", "auto", "unfused"):
            set_attention_backend(name)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            assert (out - expected).abs().max().item() < 1e-5, name
    finally:
        set_attention_backend("auto")


def test_sliding_window_attention_sees_only_the_last_w_positions() -> None:
    """CoreAttention with a window shorter than the sequence: query i attends to keys i-W+1..i (transformers' rule)."""
    from bridge.nn.core_attention import CoreAttention

    torch.manual_seed(0)
    s, window = 7, 3
    q, k, v = torch.randn(s, 1, 4, 8), torch.randn(s, 1, 2, 8), torch.randn(s, 1, 2, 8)  # [s, b, heads, d]
    out = CoreAttention(window)(q, k, v)  # [s, b, 4, d]
    i = torch.arange(s)
    allowed = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < window)
    qh, kh, vh = q[:, 0].transpose(0, 1), k[:, 0].repeat_interleave(2, 1).transpose(0, 1), v[:, 0].repeat_interleave(2, 1).transpose(0, 1)
    scores = (qh @ kh.transpose(-1, -2) / 8 ** 0.5).masked_fill(~allowed, float("-inf"))
    expected = (scores.softmax(-1) @ vh).transpose(0, 1)  # [s, 4, d]
    assert (out[:, 0] - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("softcap, sinks", [(0.5, False), (None, True), (0.5, True)], ids=["softcap", "sinks", "both"])
def test_flex_scored_attention_is_the_plain_math(window: int | None, softcap: float | None, sinks: bool) -> None:
    """CUDA runs Gemma 2's soft-capped attention and GPT-OSS's attention with sinks through FlexAttention (score_mod:
    the cap; block mask: causal, the window; the sinks from its log-sum-exp): its eager reference on the CPU gives the
    plain math's values (transformers' order), with grouped K/V. FlexAttention has no CPU backward, and its compiled
    kernel is CUDA's: both are for a GPU run to check (the sinks' gradient through the log-sum-exp is checked below)."""
    from bridge.nn.core_attention import flex_scored_attention, math_scored_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 19, 16, generator=gen) for heads in (4, 2, 2))
    logits = torch.randn(4, generator=gen) * 2 if sinks else None
    flex = flex_scored_attention(q, k, v, 0.3, window, softcap, logits, compiled=False)
    torch.testing.assert_close(flex, math_scored_attention(q, k, v, 0.3, window, softcap, logits), rtol=0, atol=1e-6)
    if sinks:  # and the sinks matter: without them the output is another
        assert (flex - math_scored_attention(q, k, v, 0.3, window, softcap)).abs().max() > 1e-2

def test_sinks_from_the_log_sum_exp_give_the_sinks_values_and_gradients() -> None:
    """On CUDA the sinks rescale FlexAttention's output by sigmoid(lse - sink) (`with_sinks`), and their gradient,
    like q's and k's through the lse, comes from autograd through that product. Here a differentiable kernel that
    returns the lse (the plain math's) stands in for FlexAttention: values and every gradient equal those of the
    softmax with the sinks as one more column (transformers' form)."""
    from bridge.nn.attention import BLOCK_KERNELS
    from bridge.nn.core_attention import math_scored_attention, with_sinks

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, 13, 16, generator=gen).requires_grad_() for heads in (4, 2, 2))
    sinks = (torch.randn(4, generator=gen) * 2).requires_grad_()
    out, lse, _ = BLOCK_KERNELS["math"].forward(q, k, v, True, 0.25)
    ours, reference = with_sinks(out, lse, sinks), math_scored_attention(q, k, v, 0.25, None, None, sinks)
    weights = torch.randn(reference.shape, generator=gen)
    for got, want in zip(torch.autograd.grad((ours * weights).sum(), (q, k, v, sinks)),
                         torch.autograd.grad((reference * weights).sum(), (q, k, v, sinks))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
