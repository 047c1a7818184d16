"""GPT-OSS beyond what the MoE suites check on its tiny model (MOE_MODELS: round trips at every EP layout, logits at
EP=2, EP=2 x TP=2, PP=2, training at EP=2 and EP=2 x TP=2): MXFP4 experts dequantised exactly as transformers does,
the same bytes; a mapping that forgets to transpose down_proj or to de-interleave gate_up_proj, a model without its
sinks or its SwiGLU clamp, and two swapped experts each fail the logit check (with intermediate = hidden, as in
the released models, so no shape check sees a transpose); YaRN with truncate false as transformers computes it;
a stacked expert tensor short of an expert is refused; the real config read as released."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridge.api import export_hf, import_hf
from bridge.apps.verify import DEFAULT_PROMPTS, compare, encode, hf_logits
from bridge.checkpoint import CheckpointMeta
from bridge.config import ModelConfig
from bridge.converters import mxfp4
from bridge.converters.megatron_legacy import LegacyCheckpointReader
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from bridge.mapping import COPY, Transform
from bridge.models import gpt_oss, load_hf_config
from bridge.nn import build_model_chunks
from bridge.parallel.state import ParallelState
from tests.model_fixtures import MODEL_OVERRIDES, load_pt, real_config
from tests.test_convert_roundtrip import read_all

TOKENS = encode(Path("/nonexistent"), DEFAULT_PROMPTS, 300)
EXPERT_TENSORS = ("gate_up_proj", "down_proj")


# ---- MXFP4 ---------------------------------------------------------------------------------------------------------
def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An HF-oriented [E, in, out] weight -> MXFP4 (blocks [E, out, in/32, 16], scales [E, out, in/32]): per block of
    32 the power of two that brings its largest magnitude to at most 6, each value rounded to the nearest FP4 code."""
    magnitudes = torch.tensor(mxfp4.FP4_VALUES[:8])
    rows = weight.transpose(-1, -2).float()
    groups = rows.reshape(*rows.shape[:-1], -1, 32)
    exponents = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2.0 ** -100) / 6.0))
    scaled = groups / torch.exp2(exponents)[..., None]
    codes = (scaled.abs()[..., None] - magnitudes).abs().argmin(-1) + 8 * (scaled < 0)
    blocks = (codes[..., 0::2] + 16 * codes[..., 1::2]).to(torch.uint8)  # the first value in the low nibble
    return blocks, (exponents + 127).to(torch.uint8)


def test_mxfp4_dequantisation_is_transformers_own_for_every_code_and_scale() -> None:
    """Every byte of blocks (two codes each) under every E8M0 scale, 0 to 255: bit for bit what transformers'
    convert_moe_packed_tensors gives for the same bytes, in its [E, in, out] orientation."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.arange(256, dtype=torch.uint8).repeat(256 * 16 // 16).view(1, 256, 16, 16)
    blocks = blocks[:, torch.randperm(256, generator=gen)]  # row r: every byte once, in another order
    scales = torch.arange(256).to(torch.uint8).view(1, 256, 1).expand(1, 256, 16).contiguous()  # row r: scale r
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    ours = mxfp4.dequantize(blocks, scales)
    assert ours.shape == theirs.shape == (1, 512, 256) and ours.dtype == torch.bfloat16
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))


def _mxfp4_checkpoint(src: Path, out: Path) -> dict[str, torch.Tensor]:
    """The bf16 tiny model with its expert weights in MXFP4, as the Hub stores them; returns the stored tensors."""
    shutil.copytree(src, out)
    stored = {}
    for name, tensor in read_all(src).items():
        if name.endswith(EXPERT_TENSORS):
            stored[name + "_blocks"], stored[name + "_scales"] = quantize_mxfp4(tensor)
        else:
            stored[name] = tensor
    (out / "model.safetensors").unlink()
    save_file(stored, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    return stored


def test_mxfp4_experts_import_as_transformers_dequantises_them(tiny_hf, tmp_path: Path) -> None:
    """A tiny GPT-OSS with MXFP4 experts, imported at EP=2 x TP=2 and exported: each expert weight is transformers'
    dequantisation of the stored bytes, the rest is copied, no _blocks/_scales name and no quantization_config
    remains, and transformers reads the export to the same logits as the MXFP4 folder it dequantises itself (verify's
    reference for an MXFP4 source)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src = tiny_hf("gpt-oss", dtype=torch.bfloat16)
    stored = _mxfp4_checkpoint(src, tmp_path / "mxfp4")
    ckpt = import_hf(tmp_path / "mxfp4", tmp_path / "m", ParallelLayout(tp=2, ep=2))
    assert CheckpointMeta.load(ckpt).dtype == "bf16"
    out = export_hf(ckpt, tmp_path / "hf")
    exported, config = read_all(out), json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and not any(n.endswith(("_blocks", "_scales")) for n in exported)
    for name, tensor in exported.items():
        if name.endswith(EXPERT_TENSORS):
            want = convert_moe_packed_tensors(stored[name + "_blocks"], stored[name + "_scales"], dtype=torch.bfloat16)
            assert torch.equal(tensor, want), name
        else:
            assert torch.equal(tensor, stored[name]), name
    theirs = hf_logits(tmp_path / "mxfp4", TOKENS[:2], "fp32", "cpu")  # verify's reference: dequantised by transformers
    for ours, reference in zip(hf_logits(out, TOKENS[:2], "fp32", "cpu"), theirs):
        assert torch.equal(ours, reference)


# ---- what the logit check must catch -------------------------------------------------------------------------------
def _logits(ckpt: Path, edit: Callable[[ModelConfig], ModelConfig] = lambda cfg: cfg) -> list[torch.Tensor]:
    """One rank's logits of a TP=PP=EP=1 checkpoint, the model read from an edited config: its tensors loaded where
    the edited model has them."""
    meta = CheckpointMeta.load(ckpt)
    model = build_model_chunks(edit(meta.config), ParallelState(meta.layout, 1, 0))[0].eval()
    state = LegacyCheckpointReader(ckpt, meta.layout).load_rank(0, 0)["model"]
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=True)
    with torch.no_grad():
        return [model(torch.tensor([t]))[:, 0, :300] for t in TOKENS]


def _swap_experts(ckpt: Path) -> Path:
    path = ckpt / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = load_pt(path)
    model = state["model"]
    for tail in ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias"):
        a, b = (f"decoder.layers.1.mlp.experts.local_experts.{j}.{tail}" for j in (0, 1))
        model[a], model[b] = model[b], model[a]
    torch.save(state, path)
    return ckpt


def _halves_gate_up(gate_up: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Read gate_up_proj as [gate | up] halves, not alternate columns."""
    return gate_up.t() if gate_up.dim() == 2 else gate_up


def test_mapping_and_block_mistakes_fail_the_logit_check(tiny_hf, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """intermediate_size = hidden_size (64; the released models: 2880 both), so a down_proj read without its transpose
    has the right shape and only the logits can tell. Each mistake must fail where the right model passes."""
    src = tiny_hf("gpt-oss", intermediate_size=64)
    reference = hf_logits(src, TOKENS, "fp32", "cpu")
    ckpt = import_hf(src, tmp_path / "right")
    no_sinks = lambda cfg: cfg.replace(attention_sinks=False)  # noqa: E731
    no_clamp = lambda cfg: cfg.replace(layers=tuple(replace(s, glu_clamp=None) for s in cfg.layers))  # noqa: E731
    cases: dict[str, list[torch.Tensor]] = {
        "right": _logits(ckpt), "without sinks": _logits(ckpt, no_sinks), "without the SwiGLU clamp": _logits(ckpt, no_clamp),
        "experts 0 and 1 swapped": _logits(_swap_experts(import_hf(src, tmp_path / "s")))}
    monkeypatch.setattr(gpt_oss, "TRANSPOSED", COPY)
    cases["down_proj not transposed"] = _logits(import_hf(src, tmp_path / "t"))
    monkeypatch.undo()
    monkeypatch.setattr(gpt_oss, "INTERLEAVED_GATE_UP", Transform("halves", _halves_gate_up, gpt_oss._gate_up_to_hf))
    cases["gate_up_proj not de-interleaved"] = _logits(import_hf(src, tmp_path / "i"))
    for case, logits in cases.items():
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, reference, logits, "fp32")
        print(f"{case:32} max abs {overall.max_abs:.3e} {'PASS' if passed else 'FAIL'}")
        assert passed == (case == "right"), f"{case}: {criterion}"


def test_stacked_expert_tensor_short_of_an_expert_is_refused(tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf("gpt-oss")
    shutil.copytree(src, tmp_path / "short")
    tensors = read_all(src)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    tensors[name] = tensors[name][:3].contiguous()
    save_file(tensors, str(tmp_path / "short" / "model.safetensors"))
    with pytest.raises(BridgeError, match=rf"wrong shape \(1\): {name} \[3, 64, 64\] \(expected \[4, 64, 64\]\)"):
        import_hf(tmp_path / "short", tmp_path / "m")


def test_rank_file_missing_an_experts_bias_is_refused(tiny_hf, tmp_path: Path) -> None:
    ckpt = import_hf(tiny_hf("gpt-oss"), tmp_path / "c", ParallelLayout(ep=2))
    path = ckpt / "release" / "mp_rank_00_001" / "model_optim_rng.pt"
    state = load_pt(path)
    del state["model"]["decoder.layers.3.mlp.experts.local_experts.0.linear_fc2.bias"]
    torch.save(state, path)
    with pytest.raises(BridgeError, match=r"missing 1: pp0/ep1/chunk0:decoder\.layers\.3\.mlp\.experts\.local_experts\.0"
                                          r"\.linear_fc2\.bias"):
        export_hf(ckpt, tmp_path / "hf")


# ---- the config --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_frequencies_are_transformers_own(truncate: bool) -> None:
    """GPT-OSS-20b's YaRN (factor 32 over 4096 positions, head_dim 64): released with truncate false, which leaves the
    ramp's ends fractional; bridge's inv_freq and cos/sin factor are transformers' for either value."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from bridge.nn.rope import RotaryEmbedding

    hf = AutoConfig.from_pretrained(real_config("gpt-oss").parent)
    hf.rope_parameters["truncate"] = truncate
    cfg = gpt_oss.config_from_hf(hf)
    assert cfg.yarn is not None and cfg.yarn.truncate is truncate
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours = RotaryEmbedding(cfg)
    assert torch.equal(ours.inv_freq, inv_freq) and ours.attention_scaling == scaling


def test_real_config_reads_as_released() -> None:
    """gpt-oss-20b: windows of 128 on the even layers, biases, sinks, the clamp at 7 with offset 1, bf16 (its
    config names no dtype), 32 experts of 2880 taking 4; 3.61B weights multiply each token (the card's 3.6B active)."""
    from bridge.training.metrics import matmul_params

    cfg = load_hf_config(real_config("gpt-oss").parent)
    assert [cfg.window(i) for i in range(4)] == [128, None, 128, None] and cfg.num_layers == 24
    assert cfg.add_qkv_bias and cfg.add_bias_linear and cfg.attention_sinks and cfg.params_dtype == "bf16"
    assert {(s.activation, s.glu_clamp, s.glu_linear_offset) for s in cfg.layers} == {("quick_gelu", 7.0, 1.0)}
    moe = cfg.moe
    assert (moe.num_experts, moe.router_topk, moe.moe_ffn_hidden_size, moe.aux_loss_coeff) == (32, 4, 2880, 0.0)
    assert matmul_params(cfg) == pytest.approx(3.61e9, rel=2e-3)
    assert ModelConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


def test_megatron_args_name_what_megatron_lm_needs_for_it() -> None:
    """The args stored in every rank file carry Megatron-LM's GPT-OSS flags: learnable softmax (the sinks), quick
    GEGLU clamped at 7 with offset 1, biases, windows of 128 (left 127) skipping every 2nd layer, YaRN unrounded."""
    from bridge.config import megatron_args

    cfg = load_hf_config(real_config("gpt-oss").parent)
    args = megatron_args(cfg, padded_vocab_size=201088, tp=1, pp=1, vpp=None, transformer_impl="transformer_engine",
                         dtype="bf16", divisible_by=128)
    assert (args.softmax_type, args.quick_geglu, args.swiglu, args.add_bias_linear) == ("learnable", True, False, True)
    assert (args.activation_func_clamp_value, args.glu_linear_offset) == (7.0, 1.0)
    assert (args.window_size, args.window_attn_skip_freq) == ((127, 0), 2)
    assert (args.position_embedding_type, args.yarn_rotary_scaling_factor, args.yarn_original_max_position_embeddings,
            args.yarn_correction_range_round_to_int) == ("yarn", 32.0, 4096, False)


@pytest.mark.parametrize("change, needle", [
    ({"swiglu_alpha": 1.5}, "swiglu_alpha=1.5 is not supported"),
    ({"attention_bias": False}, "attention_bias=false is not supported"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantised with fp8 is not supported"),
])
def test_configs_bridge_cannot_express_are_refused(change: dict[str, Any], needle: str) -> None:
    from bridge.tiny import tiny_config

    with pytest.raises(BridgeError, match=needle):
        gpt_oss.config_from_hf(tiny_config(real_config("gpt-oss"), **{**MODEL_OVERRIDES["gpt-oss"], **change}))


def test_context_parallelism_with_sinks_is_refused() -> None:
    from bridge.parallel.state import check_context_parallel

    cfg = load_hf_config(real_config("gpt-oss").parent)
    with pytest.raises(BridgeError, match="adds attention sinks to its softmax, which context parallelism does not do"):
        check_context_parallel(2, "p2p", cfg, tp=1)


def test_exported_layout_names_match_megatron_bridge(tiny_hf, tmp_path: Path) -> None:
    """Megatron-Bridge's GPT-OSS names (gpt_oss_bridge.py): the sinks as core_attention.softmax_offset, split over TP
    by heads; router and expert biases; grouped-GEMM experts as weight{j} and bias{j}."""
    ckpt = import_hf(tiny_hf("gpt-oss"), tmp_path / "g", ParallelLayout(tp=2, ep=2, moe_grouped_gemm=True))
    model = load_pt(ckpt / "release" / "mp_rank_01_001" / "model_optim_rng.pt")["model"]
    layer = sorted(k.removeprefix("decoder.layers.0.") for k in model if k.startswith("decoder.layers.0."))
    assert layer == ["mlp.experts.linear_fc1._extra_state", "mlp.experts.linear_fc1.bias0", "mlp.experts.linear_fc1.bias1",
                     "mlp.experts.linear_fc1.weight0", "mlp.experts.linear_fc1.weight1",
                     "mlp.experts.linear_fc2._extra_state", "mlp.experts.linear_fc2.bias0", "mlp.experts.linear_fc2.bias1",
                     "mlp.experts.linear_fc2.weight0", "mlp.experts.linear_fc2.weight1", "mlp.router.bias",
                     "mlp.router.weight", "pre_mlp_layernorm._extra_state", "pre_mlp_layernorm.weight",
                     "self_attention.core_attention._extra_state", "self_attention.core_attention.softmax_offset",
                     "self_attention.linear_proj._extra_state", "self_attention.linear_proj.bias",
                     "self_attention.linear_proj.weight", "self_attention.linear_qkv._extra_state",
                     "self_attention.linear_qkv.bias", "self_attention.linear_qkv.layer_norm_weight",
                     "self_attention.linear_qkv.weight"]
    sinks = load_file(tiny_hf("gpt-oss") / "model.safetensors")["model.layers.0.self_attn.sinks"]
    assert torch.equal(model["decoder.layers.0.self_attention.core_attention.softmax_offset"], sinks[4:])  # TP rank 1


def test_fp8_takes_the_attention_linears_and_their_biases(tiny_hf) -> None:
    """--fp8 (torchao, emulated on the CPU) converts linear_qkv and linear_proj of every layer, biases added after the
    FP8 product; the experts stay in bf16 (as every family's); gradients reach the biases and the sinks."""
    from bridge.nn import GPTModel
    from bridge.nn.fp8 import apply_fp8

    model = GPTModel(load_hf_config(tiny_hf("gpt-oss")), ParallelState(ParallelLayout(), 1, 0, create_groups=False),
                     params_dtype=torch.bfloat16)
    converted = apply_fp8([model], "tensorwise", emulate=True)
    assert converted == [f"0.decoder.layers.{i}.self_attention.{m}" for i in range(4)
                         for m in ("linear_qkv", "linear_proj")]
    tokens = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(0))
    model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
    attention = model.decoder.layers[0].self_attention
    for param in (attention.linear_qkv.bias, attention.linear_proj.bias, attention.core_attention.softmax_offset):
        assert param.grad is not None and param.grad.abs().sum() > 0
