"""MoE conversion: bit-exact HF -> Megatron -> HF at EP/ETP/TP/PP layouts, EP reshards, experts by name, FP8, MTP skip.

The round trips prove that import and export are inverse, not that either is right. Where experts land is checked
against hand-built expectations here (experts by name, grouped-GEMM names), and Megatron Core's own MoE model
loads Mixtral and Qwen3-MoE in tests/interop/; DeepSeek-V3's MLA and Qwen2-MoE's shared expert have neither check
(tests/README.md). FP8 dequantisation values are checked against independent references in test_fp8_dequant.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bridge import api
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from tests.model_fixtures import MOE_MODELS, load_pt
from tests.test_convert_roundtrip import assert_identical, read_all
from tests.test_fp8_dequant import dequantize_by_index, quantize_blocks

LAYOUTS = {
    "ep2": ParallelLayout(ep=2),
    "ep4": ParallelLayout(ep=4),
    "tp2": ParallelLayout(tp=2),
    "tp2-ep2-etp2": ParallelLayout(tp=2, ep=2, etp=2),
    "tp2-ep2-etp1": ParallelLayout(tp=2, ep=2, etp=1),
    "pp2-ep2": ParallelLayout(pp=2, ep=2),
    "pp2-ep4-grouped": ParallelLayout(pp=2, ep=4, moe_grouped_gemm=True),
}


@pytest.mark.parametrize("arch", sorted(MOE_MODELS))
def test_round_trip_every_ep_layout(arch: str, tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf(arch)
    for name, layout in LAYOUTS.items():
        impl = "local" if name == "tp2" and arch != "deepseek-v3" else "transformer_engine"
        ckpt = api.import_hf(src, tmp_path / name, layout, transformer_impl=impl)
        assert len(list(ckpt.rglob("model_optim_rng.pt"))) == layout.tp * layout.pp * layout.ep
        assert_identical(src, api.export_hf(ckpt, tmp_path / f"{name}-hf"))


def test_experts_accounted_for_by_name(tiny_hf, tmp_path: Path) -> None:
    """tp2 x pp2 x ep2: each expert in exactly its EP rank's files, as local index j; dense weights everywhere."""
    src = tiny_hf("mixtral")
    hf = read_all(src)
    ckpt = api.import_hf(src, tmp_path / "c", ParallelLayout(tp=2, pp=2, ep=2))
    seen: dict[tuple[int, int], int] = {}
    for tp in range(2):
        for pp in range(2):
            for ep in range(2):
                state = load_pt(ckpt / "release" / f"mp_rank_{tp:02d}_{pp:03d}_{ep:03d}" / "model_optim_rng.pt")
                model = state["model"]
                assert state["args"].expert_model_parallel_size == 2 and state["args"].num_experts == 4
                assert "decoder.layers.0.self_attention.linear_qkv.weight" in model
                experts = sorted(k for k in model if ".local_experts." in k and k.endswith(".weight"))
                assert len(experts) == 2 * 2 * 2  # 2 local layers x 2 local experts x fc1/fc2
                for layer in range(2):
                    for j in range(2):
                        e = ep * 2 + j
                        fc1 = model[f"decoder.layers.{layer}.mlp.experts.local_experts.{j}.linear_fc1.weight"]
                        hf_layer = pp * 2 + layer
                        gate = hf[f"model.layers.{hf_layer}.block_sparse_moe.experts.{e}.w1.weight"].chunk(2)[tp]
                        up = hf[f"model.layers.{hf_layer}.block_sparse_moe.experts.{e}.w3.weight"].chunk(2)[tp]
                        assert torch.equal(fc1, torch.cat([gate, up]))
                        seen[hf_layer, e] = seen.get((hf_layer, e), 0) + 1
    assert seen == {(layer, e): 2 for layer in range(4) for e in range(4)}  # every expert once per TP rank


def test_grouped_gemm_names(tiny_hf, tmp_path: Path) -> None:
    ckpt = api.import_hf(tiny_hf("qwen3-moe"), tmp_path / "g", ParallelLayout(ep=2, moe_grouped_gemm=True))
    model = load_pt(ckpt / "release" / "mp_rank_00_001" / "model_optim_rng.pt")["model"]
    moe = sorted(k for k in model if k.startswith("decoder.layers.1.mlp."))
    assert moe == ["decoder.layers.1.mlp.experts.linear_fc1._extra_state", "decoder.layers.1.mlp.experts.linear_fc1.weight0",
                   "decoder.layers.1.mlp.experts.linear_fc1.weight1", "decoder.layers.1.mlp.experts.linear_fc2._extra_state",
                   "decoder.layers.1.mlp.experts.linear_fc2.weight0", "decoder.layers.1.mlp.experts.linear_fc2.weight1",
                   "decoder.layers.1.mlp.router.weight"]
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in model and "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in model


@pytest.mark.parametrize("arch, experts", [("deepseek-v3", {}), ("gpt-oss", {"num_local_experts": 8})])
def test_reshard_between_ep_layouts_is_bit_exact(arch: str, experts: dict, tiny_hf, tmp_path: Path) -> None:
    """Through EP=4, TP=2 x EP=2 grouped, PP=2 x EP=8 x TP=2 with ETP=1, and back; GPT-OSS with 8 experts for EP=8."""
    src = tiny_hf(arch, **experts)
    a = api.import_hf(src, tmp_path / "ep4", ParallelLayout(ep=4))
    b = api.reshard(a, tmp_path / "tp2ep2g", ParallelLayout(tp=2, ep=2, moe_grouped_gemm=True))
    c = api.reshard(b, tmp_path / "pp2ep8", ParallelLayout(pp=2, ep=8, tp=2, etp=1))
    d = api.reshard(c, tmp_path / "ep1", ParallelLayout())
    assert_identical(src, api.export_hf(d, tmp_path / "hf"))
    direct = api.import_hf(src, tmp_path / "direct", ParallelLayout(tp=2, ep=2, moe_grouped_gemm=True))
    for rank_file in sorted(direct.rglob("model_optim_rng.pt")):
        left, right = load_pt(rank_file)["model"], load_pt(b / rank_file.relative_to(direct))["model"]
        assert list(left) == list(right) and all(torch.equal(left[k], right[k]) for k in left)


def test_missing_expert_file_entry_is_refused(tiny_hf, tmp_path: Path) -> None:
    ckpt = api.import_hf(tiny_hf("mixtral"), tmp_path / "c", ParallelLayout(ep=2))
    path = ckpt / "release" / "mp_rank_00_001" / "model_optim_rng.pt"
    state = load_pt(path)
    del state["model"]["decoder.layers.2.mlp.experts.local_experts.1.linear_fc2.weight"]
    torch.save(state, path)
    with pytest.raises(BridgeError, match=r"missing 1: pp0/ep1/chunk0:decoder.layers.2.mlp.experts.local_experts.1.linear_fc2"):
        api.export_hf(ckpt, tmp_path / "hf")


@pytest.mark.parametrize("layout,needle", [
    (lambda: ParallelLayout(ep=3), "num_experts = 4 is not divisible by --ep = 3"),
    (lambda: ParallelLayout(tp=2, etp=4), "--etp 4 must divide --tp 2"),
])
def test_bad_expert_layouts_are_refused(layout, needle: str, tiny_hf, tmp_path: Path) -> None:
    with pytest.raises(BridgeError, match=needle):
        api.import_hf(tiny_hf("mixtral"), tmp_path / "x", layout())


def test_ep_on_a_dense_model_is_refused(tiny_hf, tmp_path: Path) -> None:
    with pytest.raises(BridgeError, match="need a Mixture-of-Experts model"):
        api.import_hf(tiny_hf("qwen3"), tmp_path / "x", ParallelLayout(ep=2))


def _fp8_checkpoint(src: Path, out: Path, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Quantise every 2-D projection of a bf16 tiny DeepSeek-V3 like the real FP8 release; add an MTP layer.
    Returns the dequantised reference (what import must produce)."""
    shutil.copytree(src, out)
    tensors, reference = read_all(src), {}
    quantised: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and "proj" in name:
            q, scale_inv = quantize_blocks(tensor, block)
            quantised[name], quantised[name + "_scale_inv"] = q, scale_inv
            reference[name] = dequantize_by_index(q, scale_inv, block).to(torch.bfloat16)
        else:
            quantised[name] = reference[name] = tensor
    mtp = {"model.layers.4.eh_proj.weight": torch.ones(64, 128, dtype=torch.bfloat16),
           "model.layers.4.enorm.weight": torch.ones(64, dtype=torch.bfloat16)}
    (out / "model.safetensors").unlink()
    save_file({**quantised, **mtp}, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config.update(num_nextn_predict_layers=1, quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)})
    (out / "config.json").write_text(json.dumps(config))
    return reference


def test_fp8_blocks_dequantised_on_import_and_mtp_skipped(tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf("deepseek-v3", dtype=torch.bfloat16)
    reference = _fp8_checkpoint(src, tmp_path / "fp8", (16, 16))  # 16x16: several blocks, partial edge blocks
    ckpt = api.import_hf(tmp_path / "fp8", tmp_path / "m", ParallelLayout(tp=2, ep=2))
    out = read_all(api.export_hf(ckpt, tmp_path / "hf"))
    assert sorted(out) == sorted(reference)  # no scale tensors, no MTP layer
    for name, tensor in reference.items():
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], tensor), name
    q = read_all(tmp_path / "fp8")["model.layers.1.mlp.experts.3.down_proj.weight"]
    assert q.dtype == torch.float8_e4m3fn


def test_fp8_scale_with_wrong_shape_is_refused(tiny_hf, tmp_path: Path) -> None:
    _fp8_checkpoint(tiny_hf("deepseek-v3", dtype=torch.bfloat16), tmp_path / "fp8", (16, 16))
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [32, 32]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BridgeError, match=r"wrong shape \(\d+\): model\.layers\.0\.mlp\.down_proj\.weight_scale_inv \[4, 8\] \(expected \[2, 4\]\)"):
        api.import_hf(tmp_path / "fp8", tmp_path / "m")


def test_cli_ep_flags(tiny_hf, tmp_path: Path) -> None:
    from bridge.cli.main import main

    src, out = tiny_hf("qwen2-moe"), tmp_path / "m"
    assert main(["import", str(src), "--out", str(out), "--tp", "2", "--ep", "2", "--etp", "1", "--moe-grouped-gemm"]) == 0
    layout = json.loads((out / "bridge.json").read_text())["layout"]
    assert (layout["ep"], layout["etp"], layout["moe_grouped_gemm"]) == (2, 1, True)
    assert sorted(p.name for p in (out / "release").iterdir()) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert main(["reshard", str(out), "--out", str(tmp_path / "r"), "--ep", "4"]) == 0
    assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "hf")]) == 0
    assert_identical(src, tmp_path / "hf")


def test_group_routing_megatron_cannot_match_is_warned(tiny_hf, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """transformers scores an expert group by its top 2 experts, Megatron-LM by its top (top-k / group top-k): import
    says so where they differ (the tiny config: top-2 from 2 groups), and not for DeepSeek-V3's own top-8 from 4."""
    with caplog.at_level("WARNING"):
        api.import_hf(tiny_hf("deepseek-v3"), tmp_path / "differs")
    assert "Megatron-LM would route differently" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        api.import_hf(tiny_hf("deepseek-v3", num_experts_per_tok=4), tmp_path / "agrees")
    assert "route differently" not in caplog.text
