"""Interop: Megatron Core's own MoE GPTModel (local spec, SequentialMLP, allgather dispatcher) loads bridge's files
strictly, at EP=1 and EP=2 (each EP rank its `mp_rank_00_00E` file), and gives transformers' logits in fp32, for the
four MoE families bridge converts:

- Mixtral: softmax top-k router, every layer MoE;
- Qwen3-MoE: q/k norm, dense and MoE layers alternating (decoder_sparse_step=2);
- Qwen2-MoE: qkv bias, pre-softmax router without renormalisation, a shared expert with its sigmoid gate
  (`moe_shared_expert_intermediate_size`, `moe_shared_expert_gate`), a dense layer (mlp_only_layers);
- DeepSeek-V3: MLA (q and kv LoRA, split nope/rope head dims, v_head_dim) with YaRN RoPE, a dense first layer
  (first_k_dense_replace), a shared expert, the sigmoid router with score-correction bias, group-limited top-k and
  the routed scaling factor. Its tiny model gets random score-correction biases (transformers initialises them to
  zero) and top-k 4 of 16 experts in 4 groups: Megatron ranks a group by the sum of its top (top-k / group top-k)
  scores where transformers always sums the top 2, so the two agree only when top-k = 2 x group top-k, as in the
  real DeepSeek-V3 (8 of 256, 4 groups). bridge writes MLA for the Transformer Engine spec only (the local spec
  splits the MLA down-projections over TP) and Megatron Core cannot build that spec without Transformer Engine, so
  the worker loads its file into the local MLA spec after the TE -> local renames (megatron_moe_worker.MLA_TE_TO_LOCAL).

Skipped without megatron-core and triton."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bridge.api import import_hf
from bridge.launch import launch
from bridge.layout import ParallelLayout
from bridge.apps.verify import DEFAULT_PROMPTS, compare, encode, hf_logits
from tests.interop.common import MEGATRON_CORE_MARKS

pytestmark = MEGATRON_CORE_MARKS
MODELS = ("mixtral", "qwen3-moe", "qwen2-moe", "deepseek-v3", "glm4.5-air")
#: On top of tests/model_fixtures.MODEL_OVERRIDES (see the module docstring).
OVERRIDES = {"deepseek-v3": {"n_routed_experts": 16, "num_experts_per_tok": 4}}
IMPL = {"deepseek-v3": "transformer_engine"}  # MLA: see the module docstring


def _random_expert_bias(hf: Path, out: Path) -> Path:
    """A copy of a tiny DeepSeek model whose score-correction biases are random, so that they steer the selection."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf, out)
    gen = torch.Generator().manual_seed(0)
    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        biases = [k for k in tensors if k.endswith(".mlp.gate.e_score_correction_bias")]
        assert biases, f"no score-correction bias in {path}"
        for key in biases:
            tensors[key] = torch.randn(tensors[key].shape, generator=gen) * 0.05
        save_file(tensors, path, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def hf_dirs(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    dirs = [tiny_hf(name, **OVERRIDES.get(name, {})) for name in MODELS]
    at = MODELS.index("deepseek-v3")
    dirs[at] = _random_expert_bias(dirs[at], tmp_path_factory.mktemp("deepseek-v3-bias") / "hf")
    return dirs


@pytest.fixture(scope="module")
def references(hf_dirs: list[Path]) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    tokens = encode(hf_dirs[0], DEFAULT_PROMPTS, 300)
    return tokens, [hf_logits(hf, tokens, "fp32", "cpu") for hf in hf_dirs]


@pytest.mark.parametrize("ep", [1, 2])
def test_megatron_core_moe_matches_hf(hf_dirs, references, tmp_path: Path, ep: int) -> None:
    from tests.interop.megatron_moe_worker import megatron_moe_logits

    ckpts = [str(import_hf(hf, tmp_path / name, ParallelLayout(ep=ep), transformer_impl=IMPL.get(name, "local")))
             for name, hf in zip(MODELS, hf_dirs)]
    tokens, refs = references
    megatron = launch(megatron_moe_logits, ep, ckpts, tokens)[0]
    for name, ref, ours in zip(MODELS, refs, megatron):
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, ref, ours, "fp32")
        print(f"{name} ep={ep}: Megatron Core vs transformers max abs {overall.max_abs:.2e} top-1 {overall.top1:.0%}")
        assert passed, f"{name} at EP={ep}: Megatron Core's logits differ from transformers': {criterion}"
        assert overall.top1 == 1.0
