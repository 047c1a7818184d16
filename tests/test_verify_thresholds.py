"""`bridge verify`'s fp32 bound, pinned by value and by checkpoints that miss it by small margins on either side.

The broken checkpoints of tests/test_verify.py are off by 4e-3 to 4e-2 in the logits, so they would still fail
under a bound ten times looser. Here one layer's input norm is scaled by 1.001 (a 0.1% error in one weight
vector), which moves the logits by 1e-4 to 1e-3 of their scale: verify must fail it at the documented 1e-4, and
would pass it at 1e-3. Scaled by 1.0001 instead, the logits move by 1e-5 to 1e-4: verify must pass it, and would
fail it at 1e-5. The reference is transformers' fp32 forward of the unmodified model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bridge.apps import verify as bridge_verify
from bridge.api import import_hf
from bridge.layout import ParallelLayout
from bridge.apps.verify import DEFAULT_PROMPTS, compare, encode, hf_logits, sharded_logits
from tests.model_fixtures import load_pt

TOKENS = encode(Path("/nonexistent"), DEFAULT_PROMPTS, 300)
NORM = "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"  # layer 1's input norm (TE spec)


def test_documented_thresholds() -> None:
    assert bridge_verify.FP32_MAX_ABS_REL == 1e-4  # docs/verify.md and README: max abs <= 1e-4 x logit scale


def _scale_norm(ckpt: Path, factor: float) -> None:
    path = ckpt / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = load_pt(path)
    state["model"][NORM] = state["model"][NORM] * factor
    torch.save(state, path)


def test_fp32_verdict_on_both_sides_of_the_bound(tiny_hf, tmp_path: Path) -> None:
    src = tiny_hf("qwen2")
    ref = hf_logits(src, TOKENS, "fp32", "cpu")
    factors = {"norm x 1.0001": 1.0001, "norm x 1.001": 1.001}
    ckpts = []
    for name, factor in factors.items():
        ckpt = import_hf(src, tmp_path / name.replace(" ", ""), ParallelLayout())
        _scale_norm(ckpt, factor)
        ckpts.append(ckpt)
    results = {}
    for name, logits in zip(factors, sharded_logits(ckpts, TOKENS)):
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, ref, logits, "fp32")
        relative = overall.max_abs / max(1.0, overall.logit_scale)  # verify's normalisation
        print(f"{name}: max abs {overall.max_abs:.3e}, {relative:.2e} of the logit scale: {criterion}")
        results[name] = (relative, passed, criterion)
    relative, passed, criterion = results["norm x 1.001"]
    assert 1.5e-4 < relative < 7e-4, relative  # the error itself, measured without the verdict
    assert not passed, f"a 0.1% error in one norm must fail fp32 verify: {criterion}"
    relative, passed, criterion = results["norm x 1.0001"]
    assert 1.5e-5 < relative < 7e-5, relative
    assert passed, f"a 0.01% error in one norm is inside the fp32 bound: {criterion}"
