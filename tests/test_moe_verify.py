"""MoE/MLA logit parity of bridge.nn against transformers (fp32, CPU, gloo) at EP=2, EP=2 x TP=2 (also with
sequence parallelism) and PP=2, all four architectures per spawned group, and at CP=2 with EP=2 spread over it; a
swapped expert must fail the check."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bridge.api import import_hf
from bridge.converters.megatron_legacy import LegacyCheckpointReader
from bridge.checkpoint import CheckpointMeta
from bridge.layout import ParallelLayout
from bridge.nn import build_model_chunks, load_rank_checkpoint
from bridge.parallel.state import ParallelState
from bridge.apps.verify import DEFAULT_PROMPTS, compare, encode, hf_logits, sharded_logits, verify
from tests.model_fixtures import MOE_MODELS, load_pt

TOKENS = encode(Path("/nonexistent"), DEFAULT_PROMPTS, 300)
LAYOUTS = {"ep2": ParallelLayout(ep=2), "ep2-tp2": ParallelLayout(ep=2, tp=2, moe_grouped_gemm=True),
           "pp2": ParallelLayout(pp=2)}


@pytest.fixture(scope="module")
def references(tiny_hf) -> dict[str, tuple[Path, list[torch.Tensor]]]:
    return {arch: (tiny_hf(arch), hf_logits(tiny_hf(arch), TOKENS, "fp32", "cpu")) for arch in sorted(MOE_MODELS)}


#: expert weight name of local expert j's fc: SequentialMLP's (local_experts.j) or TEGroupedMLP's (weight j)
EXPERT_NAMES = {False: "decoder.layers.1.mlp.experts.local_experts.{j}.{fc}.weight",
                True: "decoder.layers.1.mlp.experts.{fc}.weight{j}"}


def _swap_experts(ckpt: Path, rank_dir: str, grouped: bool = False) -> None:
    """Swap local experts 0 and 1 of layer 1 (same file, so it still loads strictly)."""
    path = ckpt / "release" / rank_dir / "model_optim_rng.pt"
    state = load_pt(path)
    model = state["model"]
    for fc in ("linear_fc1", "linear_fc2"):
        a, b = (EXPERT_NAMES[grouped].format(j=j, fc=fc) for j in (0, 1))
        model[a], model[b] = model[b], model[a]
    torch.save(state, path)


def test_single_rank_logits_match_transformers(references: dict, tmp_path: Path) -> None:
    """In-process (no spawn): TP=PP=EP=1 for every architecture, both expert namings."""
    for arch, (src, ref) in references.items():
        for grouped in (False, True):
            ckpt = import_hf(src, tmp_path / f"{arch}-{grouped}", ParallelLayout(moe_grouped_gemm=grouped))
            meta = CheckpointMeta.load(ckpt)
            chunks = build_model_chunks(meta.config, ParallelState(meta.layout, 1, 0))
            load_rank_checkpoint(chunks, LegacyCheckpointReader(ckpt, meta.layout).load_rank(0, 0))
            with torch.no_grad():
                ours = [chunks[0].eval()(torch.tensor([t]))[:, 0, :300] for t in TOKENS]
            assert compare(DEFAULT_PROMPTS, ref, ours, "fp32")[2], arch


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sharded_logits_match_transformers(name: str, references: dict, tmp_path: Path) -> None:
    layout = LAYOUTS[name]
    ckpts = {arch: import_hf(src, tmp_path / arch, layout) for arch, (src, _) in references.items()}
    if layout.ep == 2 and layout.tp == 1:
        ckpts["broken"] = import_hf(references["mixtral"][0], tmp_path / "broken", layout)
        _swap_experts(ckpts["broken"], "mp_rank_00_001")
    for key, logits in zip(ckpts, sharded_logits(list(ckpts.values()), TOKENS)):
        ref = references["mixtral" if key == "broken" else key][1]
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, ref, logits, "fp32")
        print(f"{name:8} {key:12} max abs {overall.max_abs:.3e} top-1 {overall.top1:.1%} {'PASS' if passed else 'FAIL'}")
        assert passed == (key != "broken"), f"{key} at {name}: {criterion}"


@pytest.mark.slow
def test_cp_with_experts_split_over_cp_ranks_matches_transformers(references: dict, tmp_path: Path) -> None:
    """World 2 = CP 2 x EP 2: each CP rank holds half of every prompt and half of the experts, and the tokens of both
    halves travel to their experts by all-to-all."""
    tokens = [t[:len(t) // 4 * 4] for t in TOKENS]  # 2 x cp chunks
    archs = ("mixtral", "qwen3-moe", "deepseek-v3")  # DeepSeek: MLA's scale and narrower v through the ring
    ckpts = {arch: import_hf(references[arch][0], tmp_path / arch, ParallelLayout(ep=2)) for arch in archs}
    ckpts["broken"] = import_hf(references["mixtral"][0], tmp_path / "broken", ParallelLayout(ep=2))
    _swap_experts(ckpts["broken"], "mp_rank_00_001")
    for key, logits in zip(ckpts, sharded_logits(list(ckpts.values()), tokens, cp=2)):
        ref = [r[:len(t)] for r, t in zip(references["mixtral" if key == "broken" else key][1], tokens)]
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, ref, logits, "fp32")
        print(f"cp2-ep2   {key:12} max abs {overall.max_abs:.3e} top-1 {overall.top1:.1%} {'PASS' if passed else 'FAIL'}")
        assert passed == (key != "broken"), f"{key} at cp2-ep2: {criterion}"


@pytest.mark.slow
def test_sequence_parallel_with_experts_matches_transformers(references: dict, tmp_path: Path) -> None:
    """TP=2 x EP=2 with sequence parallelism: each TP rank routes its half of every prompt (and runs MLA's
    down-projections on it), the experts see the whole TP sequence; a swapped expert must still fail."""
    tokens = [t[:len(t) // 2 * 2] for t in TOKENS]
    layout = LAYOUTS["ep2-tp2"]
    ckpts = {arch: import_hf(src, tmp_path / arch, layout) for arch, (src, _) in references.items()}
    ckpts["broken"] = import_hf(references["mixtral"][0], tmp_path / "broken", layout)
    _swap_experts(ckpts["broken"], "mp_rank_01_001", grouped=True)
    for key, logits in zip(ckpts, sharded_logits(list(ckpts.values()), tokens, sequence_parallel=True)):
        ref = [r[:len(t)] for r, t in zip(references["mixtral" if key == "broken" else key][1], tokens)]
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, ref, logits, "fp32")
        print(f"ep2-tp2-sp {key:12} max abs {overall.max_abs:.3e} top-1 {overall.top1:.1%} {'PASS' if passed else 'FAIL'}")
        assert passed == (key != "broken"), f"{key} at ep2-tp2 with SP: {criterion}"
    result = verify(references["deepseek-v3"][0], ckpts["deepseek-v3"], sequence_parallel=True, write_json=False)
    assert result.passed and " ep=2 sp " in result.table() and result.layout["sequence_parallel"], result.table()
    assert all(m.tokens % 2 == 0 for m in result.prompts)  # each prompt cut to a multiple of tp
