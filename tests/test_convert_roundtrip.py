"""HF -> Megatron -> HF and Megatron -> reshard -> HF are bit-exact for every dense architecture.

A round trip proves that import and export are inverse, not that either is right: a weight put in the wrong place
on import and moved back on export passes. That import writes what Megatron means is the job of the layout tests
(test_megatron_layout.py, test_transforms.py) and of the Megatron Core interop tests (tests/interop/); see
tests/README.md for which architectures they cover.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bridge import api
from bridge.layout import ParallelLayout
from tests.model_fixtures import DENSE_MODELS, load_pt

LAYOUTS = {
    "tp1": ParallelLayout(),
    "tp2": ParallelLayout(tp=2),
    "tp4": ParallelLayout(tp=4),
    "pp2": ParallelLayout(pp=2),
    "tp2pp2": ParallelLayout(tp=2, pp=2),
    "pp2vpp2": ParallelLayout(pp=2, vpp=2),
}


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = read_all(a), read_all(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("arch", sorted(DENSE_MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_every_layout(arch: str, dtype: torch.dtype, tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf(arch, dtype=dtype)
    for name, layout in LAYOUTS.items():
        impl = "local" if name in ("tp2", "pp2vpp2") else "transformer_engine"
        ckpt = api.import_hf(src, tmp_path / name, layout, transformer_impl=impl)
        out = api.export_hf(ckpt, tmp_path / f"{name}-hf")
        assert_identical(src, out)


@pytest.mark.parametrize("arch", ["llama32-tied", "qwen2", "qwen3"])
def test_reshard_chain_is_bit_exact(arch: str, tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf(arch)
    ckpt = api.import_hf(src, tmp_path / "tp4", ParallelLayout(tp=4))
    a = api.reshard(ckpt, tmp_path / "tp2pp2", ParallelLayout(tp=2, pp=2), transformer_impl="local")
    b = api.reshard(a, tmp_path / "pp2vpp2", ParallelLayout(pp=2, vpp=2), transformer_impl="transformer_engine")
    c = api.reshard(b, tmp_path / "tp1", ParallelLayout())
    assert_identical(src, api.export_hf(c, tmp_path / "hf"))
    direct = api.import_hf(src, tmp_path / "direct-tp2pp2", ParallelLayout(tp=2, pp=2), transformer_impl="local")
    for rank_file in sorted(direct.rglob("model_optim_rng.pt")):
        twin = a / rank_file.relative_to(direct)
        left, right = (load_pt(p)["model"] for p in (rank_file, twin))
        assert list(left) == list(right)
        assert all(torch.equal(left[k], right[k]) for k in left)


def test_dtype_cast_on_import_and_export(tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf("qwen3")
    ckpt = api.import_hf(src, tmp_path / "bf16", ParallelLayout(tp=2), dtype="bf16")
    info = api.inspect_checkpoint(ckpt)
    assert info["dtypes"] == ["bf16"]
    out = read_all(api.export_hf(ckpt, tmp_path / "hf", dtype="fp32"))
    ref = read_all(src)
    for name, tensor in ref.items():
        assert torch.equal(out[name], tensor.to(torch.bfloat16).to(torch.float32)), name


def test_export_shards_and_loads_in_transformers(tiny_hf, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = tiny_hf("llama31")
    ckpt = api.import_hf(src, tmp_path / "ck", ParallelLayout(tp=2, pp=2))
    out = api.export_hf(ckpt, tmp_path / "hf", max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    assert_identical(src, out)
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    ref = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
    got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(ref, got)
