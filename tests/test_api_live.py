"""AutoBridge on a live TP=2 x PP=2 job (4 gloo ranks): HF weights in, HF-named weights streamed out, bit for bit."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

from bridge import AutoBridge, ParallelLayout
from bridge.launch import launch


def peak_tracked_bytes(prof: torch.profiler.profile) -> int:
    """Peak of the running sum of the CPU allocations (+) and frees (-) the profiler recorded, in time order.

    Each op contributes its own (self) allocations; frees outside any op are `[memory]` events.
    """
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def stream_on_rank(folder: str, layout: ParallelLayout, impl: str, to: str) -> dict:
    """Runs on each rank: build + load, stream every weight, measure peak extra RSS while streaming."""
    bridge = AutoBridge.from_hf(folder)
    chunks = bridge.build_model(layout, transformer_impl=impl)
    ref = load_file(Path(folder) / "model.safetensors")
    seen: list[str] = []
    mismatched: list[str] = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for name, tensor in bridge.export_hf_weights(chunks, to=to):
            seen.append(name)
            if not (tensor.dtype == ref[name].dtype and torch.equal(tensor, ref[name])):
                mismatched.append(name)
            del tensor
    peak_extra = peak_tracked_bytes(prof)
    subset = dict(bridge.export_hf_weights(chunks, names=["model.layers.3.mlp.up_proj.weight"], dtype=torch.bfloat16))
    return {"seen": seen, "mismatched": mismatched, "peak_extra": peak_extra, "subset": subset,
            "expected": sorted(ref)}


@pytest.mark.parametrize("arch,impl", [("llama31", "transformer_engine"), ("qwen3-tied", "local")])
def test_streamed_weights_equal_the_hf_source(live: Callable, arch: str, impl: str) -> None:
    results, _ = live(f"stream-{arch}-{impl}")
    largest = 32000 * 256 * 4
    for rank, r in enumerate(results):
        assert r["mismatched"] == [], (rank, r["mismatched"])
        assert sorted(r["seen"]) == r["expected"] and len(r["seen"]) == len(set(r["seen"])), rank
        # One full tensor plus its TP shards (together another full tensor), plus 2 MiB for the small tensors
        # in flight beside them (a layer's 256 KiB weights and their shards; 1 MiB was exceeded by 0.5 MiB once in
        # CI). Holding the whole model would take 2 x 32.8 MB of embeddings plus a few MB of layers.
        assert r["peak_extra"] <= 2 * largest + 2 * 2**20, (rank, r["peak_extra"])
        assert r["peak_extra"] > largest // 2, "the measurement should see at least the gathered embedding"
        (name, tensor), = r["subset"].items()
        assert name == "model.layers.3.mlp.up_proj.weight" and tensor.dtype == torch.bfloat16


def rank0_only_then_save(folder: str, layout: ParallelLayout, out: str) -> int:
    """Stream to rank 0 (how many weights this rank received), then `save_hf` from the same live model."""
    bridge = AutoBridge.from_hf(folder)
    chunks = bridge.build_model(layout)
    count = len(list(bridge.export_hf_weights(chunks, to="rank0")))
    bridge.save_hf(chunks, out)
    return count


def test_rank0_destination_and_save_hf(tiny_hf, live: Callable) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_hf("llama32-tied")
    counts, saved = live("rank0-save")
    expected = len(load_file(folder / "model.safetensors"))
    assert counts == [expected, 0, 0, 0]
    ref, got = load_file(folder / "model.safetensors"), load_file(saved / "model.safetensors")
    assert sorted(ref) == sorted(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    a = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
    b = AutoModelForCausalLM.from_pretrained(saved)(ids).logits
    assert torch.equal(a, b)


def test_build_model_needs_distributed(tiny_hf) -> None:
    from bridge.errors import BridgeError

    with pytest.raises(BridgeError, match="needs torch.distributed"):
        AutoBridge.from_hf(tiny_hf("qwen2")).build_model(ParallelLayout(tp=2))


def test_repr_and_config(tiny_hf) -> None:
    b = AutoBridge.from_hf(tiny_hf("qwen2"))
    assert b.architecture == "Qwen2ForCausalLM" and b.config.add_qkv_bias
    assert "Qwen2ForCausalLM" in repr(b)


def stream_moe(folder: str, layout: ParallelLayout) -> tuple[list[str], list[str]]:
    bridge = AutoBridge.from_hf(folder)
    chunks = bridge.build_model(layout)
    ref = load_file(Path(folder) / "model.safetensors")
    seen, mismatched = [], []
    for name, tensor in bridge.export_hf_weights(chunks):
        seen.append(name)
        if not torch.equal(tensor, ref[name]):
            mismatched.append(name)
    return seen, mismatched


def test_expert_parallel_model_streams_every_expert(tiny_hf, live: Callable) -> None:
    """TP=2 x EP=2 (4 ranks): each EP rank loads only its experts; every rank receives all of them back."""
    folder = tiny_hf("qwen2-moe")  # routed experts + gated shared expert, one dense layer
    ref = sorted(load_file(folder / "model.safetensors"))
    for seen, mismatched in live("moe")[0]:
        assert mismatched == []
        assert sorted(seen) == ref and len(seen) == len(set(seen))
        assert any(".mlp.experts.3." in name for name in seen)


# ---- one world of 4 ranks for the cases above -----------------------------------------------------------------
def _live_cases(cases: list[tuple[Callable[..., Any], tuple]]) -> list[Any]:
    """Runs on each rank: the cases one after the other in the same world (one start-up for all of them)."""
    results = []
    for fn, args in cases:
        try:
            results.append(fn(*args))
        except Exception as exc:
            raise RuntimeError(f"{fn.__name__}: {type(exc).__name__}: {exc}") from exc
    return results


@pytest.fixture(scope="module")
def live(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[list[Any], Path]]:
    """`live(case)` -> (each rank's result, the case's output folder). Every case runs on 4 ranks; all of them share
    one launch; if that launch fails, the case runs alone, so each test reports its own failure."""
    # vocab 32000 x hidden 256 fp32: a 32.8 MB embedding dominates, so RSS differences are measurable.
    big = dict(vocab_size=32000, hidden_size=256, intermediate_size=256, num_hidden_layers=4)
    tp2pp2 = ParallelLayout(tp=2, pp=2)
    root = tmp_path_factory.mktemp("live")

    def cases(out: Path) -> dict[str, tuple[Callable[..., Any], tuple]]:
        return {
            "stream-llama31-transformer_engine": (stream_on_rank, (str(tiny_hf("llama31", **big)), tp2pp2,
                                                                   "transformer_engine", "all")),
            "stream-qwen3-tied-local": (stream_on_rank, (str(tiny_hf("qwen3-tied", **big)), tp2pp2, "local", "all")),
            "rank0-save": (rank0_only_then_save, (str(tiny_hf("llama32-tied")), tp2pp2, str(out / "rank0-save"))),
            "moe": (stream_moe, (str(tiny_hf("qwen2-moe")), ParallelLayout(tp=2, ep=2))),
        }

    shared: list[list[Any]] | None = None
    tried = False

    def run(case: str) -> tuple[list[Any], Path]:
        nonlocal shared, tried
        if not tried:
            tried = True
            try:
                shared = launch(_live_cases, 4, list(cases(root / "shared").values()), threads=1)
            except Exception:  # noqa: BLE001 - rerun below, case by case
                shared = None
        if shared is None:
            out = root / case
            return [r[0] for r in launch(_live_cases, 4, [cases(out)[case]], threads=1)], out / case
        return [r[list(cases(root / "shared")).index(case)] for r in shared], root / "shared" / case

    return run
