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
- GLM-4.5: qkv bias and partial rotary (`rotary_percent` 0.5) with DeepSeek-V3's router and shared expert, and its
  MTP layer, which Megatron Core builds (`mtp_block_spec`) and loads strictly under its module name `mtp_model_layer`
  (bridge writes the checkpoint name `transformer_layer`). The MTP layer's own logits are checked too, against the
  same computation built from transformers' GLM decoder layer and the checkpoint's tensors (Megatron Core's and vLLM's
  MTP: the main model's normalised last hidden state at i and token i + 1's embedding, each normalised, projected
  from [embedding; hidden], one decoder layer, shared_head.norm, the shared head); one with enorm and hnorm swapped
  must fail.

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


def _mtp_reference(hf: Path, token_lists: list[list[int]]) -> list[torch.Tensor]:
    """The MTP layer's logits per prompt, [s - 1, V] (position i predicts token i + 2), from transformers' own GLM
    decoder layer, RMSNorm and model, with the checkpoint's `model.layers.{L}` tensors (see the module docstring)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    config = model.config
    prefix = f"model.layers.{config.num_hidden_layers}."
    tensors = {k[len(prefix):]: v for k, v in load_file(hf / "model.safetensors").items() if k.startswith(prefix)}
    own = {name: tensors.pop(name) for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                                                "embed_tokens.weight", "shared_head.head.weight")}
    experts = range(config.n_routed_experts)
    expert = lambda e, name: tensors.pop(f"mlp.experts.{e}.{name}.weight")  # noqa: E731
    tensors["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([expert(e, "gate_proj"), expert(e, "up_proj")])
                                                       for e in experts])
    tensors["mlp.experts.down_proj"] = torch.stack([expert(e, "down_proj") for e in experts])
    layer = Glm4MoeDecoderLayer(config, config.num_hidden_layers).eval()
    layer.load_state_dict(tensors, strict=True)

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return own[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps))

    out = []
    with torch.no_grad():
        for ids in token_lists:
            ids = torch.tensor([list(ids)])
            s = ids.shape[1] - 1
            hidden = model.model(ids).last_hidden_state[:, :s]  # after the model's final norm, as Megatron's block
            x = torch.cat([norm(model.model.embed_tokens(ids[:, 1:]), "enorm.weight"), norm(hidden, "hnorm.weight")], -1)
            x = x @ own["eh_proj.weight"].t()
            positions = torch.arange(s)[None]
            mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
            x = layer(x, attention_mask=mask, position_ids=positions,
                      position_embeddings=model.model.rotary_emb(x, positions))
            out.append(model.lm_head(norm(x, "shared_head.norm.weight"))[0])
    return out


def test_megatron_core_mtp_layer_matches_transformers_modules(hf_dirs, references, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from bridge.models import FAMILIES, Family
    from tests.interop.megatron_moe_worker import megatron_moe_logits

    hf, tokens = hf_dirs[MODELS.index("glm4.5-air")], references[0]
    reference = _mtp_reference(hf, tokens)
    ckpts = {"glm4.5-air": import_hf(hf, tmp_path / "ok", ParallelLayout(ep=2), transformer_impl="local")}
    original = FAMILIES["Glm4MoeForCausalLM"]
    swap = {".enorm.weight": ".hnorm.weight", ".hnorm.weight": ".enorm.weight"}

    def rows(cfg):  # noqa: ANN001, ANN202 - the mapping with the MTP layer's enorm and hnorm read from each other
        swapped = lambda name: next((name.replace(a, b) for a, b in swap.items() if name.endswith(a)), name)  # noqa: E731
        return [replace(r, hf=tuple(map(swapped, r.hf))) for r in original.rows(cfg)]

    monkeypatch.setitem(FAMILIES, "Glm4MoeForCausalLM", Family("Glm4MoeForCausalLM", original.config_from_hf, rows))
    ckpts["enorm-hnorm-swapped"] = import_hf(hf, tmp_path / "swapped", ParallelLayout(ep=2), transformer_impl="local")
    megatron = launch(megatron_moe_logits, 2, [str(c) for c in ckpts.values()], tokens, True)[0]
    for name, ours in zip(ckpts, megatron):
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, reference, ours, "fp32")
        print(f"{name} MTP layer: Megatron Core vs transformers' modules max abs {overall.max_abs:.2e} "
              f"top-1 {overall.top1:.0%}")
        assert passed == (name == "glm4.5-air"), f"{name}: {criterion}"
