"""GLM-4.5 (Glm4MoeForCausalLM) beyond what it shares with the other MoE families (tests/test_moe_convert.py,
test_moe_verify.py and test_train_moe.py take it from MOE_MODELS): its MTP layer under Megatron Core's names on the
last stage, every routed expert (the MTP layer's too) in its EP rank's files by name, a bf16 source bit-exact through
EP reshards, logits against transformers with q/k norms on and off, mappings verify must fail (partial rotary on the
wrong channels or in the wrong pairing, no qkv bias, no score-correction bias), and the trainer's MTP rules.

The fixture is transformers' Glm4MoeConfig() defaults, which have GLM-4.5-Air's shape (no copy of the released
config.json was found; tests/configs/README.md), scaled down, with qkv bias on as in the released configs, and with the
MTP layer and a nonzero score-correction bias added after save_pretrained (tests/model_fixtures.py).
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridge.api import export_hf, import_hf, reshard
from bridge.apps.verify import DEFAULT_PROMPTS, compare, encode, hf_logits, sharded_logits
from bridge.cli.main import main
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from bridge.mapping import Transform
from bridge.training import TrainConfig
from bridge.training.plan import make_plan
from tests.model_fixtures import load_pt
from tests.test_convert_roundtrip import assert_identical, read_all

ARCH = "Glm4MoeForCausalLM"
MTP = "model.layers.4."  # the tiny model's HF layers 0..3 (0 dense), then its MTP layer
TOKENS = encode(Path("/nonexistent"), DEFAULT_PROMPTS, 300)


def _rank_model(ckpt: Path, tp: int, pp: int, ep: int) -> dict[str, Any]:
    return load_pt(ckpt / "release" / f"mp_rank_{tp:02d}_{pp:03d}_{ep:03d}" / "model_optim_rng.pt")


def test_mtp_layer_under_megatron_core_names_on_the_last_stage(tiny_hf, tmp_path: Path) -> None:
    """tp2 x pp2 x ep2, grouped GEMM: the MTP layer is in the last stage's files only, between the final norm and the
    head, its own modules and its transformer layer under Megatron-Bridge's names, with its EP rank's experts; the
    embedding and head copies are not stored (Megatron's MTP shares the model's)."""
    src = tiny_hf("glm4.5-air")
    hf = read_all(src)
    ckpt = import_hf(src, tmp_path / "c", ParallelLayout(tp=2, pp=2, ep=2, moe_grouped_gemm=True))
    layer = "mtp.layers.0.transformer_layer."
    for tp in range(2):
        for ep in range(2):
            assert not any(k.startswith("mtp.") for k in _rank_model(ckpt, tp, 0, ep)["model"])
            state = _rank_model(ckpt, tp, 1, ep)
            assert state["args"].mtp_num_layers == 1
            model = state["model"]
            mtp = [k for k in model if k.startswith("mtp.")]
            keys = list(model)
            assert keys.index("decoder.final_layernorm.weight") < keys.index(mtp[0])
            assert keys.index(mtp[-1]) < keys.index("output_layer.weight")
            own = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
                   "final_layernorm.weight": "shared_head.norm.weight"}
            for name, hf_name in own.items():
                assert torch.equal(model["mtp.layers.0." + name], hf[MTP + hf_name]), name
            assert torch.equal(model["mtp.layers.0.eh_proj.weight"], hf[MTP + "eh_proj.weight"].chunk(2)[tp])  # column
            assert torch.equal(model[layer + "self_attention.linear_qkv.layer_norm_weight"], hf[MTP + "input_layernorm.weight"])
            assert torch.equal(model[layer + "pre_mlp_layernorm.weight"], hf[MTP + "post_attention_layernorm.weight"])
            assert torch.equal(model[layer + "mlp.router.expert_bias"], hf[MTP + "mlp.gate.e_score_correction_bias"])
            assert sorted(k for k in mtp if ".experts." in k) == sorted(
                [f"{layer}mlp.experts.linear_fc{i}.weight{j}" for i in (1, 2) for j in range(4)]
                + [f"{layer}mlp.experts.linear_fc{i}._extra_state" for i in (1, 2)])
            assert {f"mtp.layers.0.{m}._extra_state" for m in ("enorm", "hnorm", "eh_proj", "final_layernorm")} <= set(mtp)
            assert not any("embed" in k or "output" in k or "head" in k for k in mtp)


@pytest.mark.parametrize("grouped", [False, True], ids=["sequential", "grouped"])
def test_every_expert_in_its_ep_rank_files_by_name(grouped: bool, tiny_hf, tmp_path: Path) -> None:
    """tp2 x pp2 x ep2: every routed expert of every MoE layer, the MTP layer's included, is in its EP rank's files
    as local expert j (weight j when grouped) and nowhere else, with this TP rank's [gate; up] rows and down columns."""
    src = tiny_hf("glm4.5-air")
    hf = read_all(src)
    ckpt = import_hf(src, tmp_path / "c", ParallelLayout(tp=2, pp=2, ep=2, moe_grouped_gemm=grouped))
    seen: Counter = Counter()
    for tp in range(2):
        for pp in range(2):
            for ep in range(2):
                model = _rank_model(ckpt, tp, pp, ep)["model"]
                layers = {f"decoder.layers.{j}.": 2 * pp + j for j in range(2) if 2 * pp + j > 0}  # layer 0 is dense
                if pp == 1:
                    layers["mtp.layers.0.transformer_layer."] = 4
                for prefix, hf_layer in layers.items():
                    experts = [k for k in model if k.startswith(prefix + "mlp.experts.") and "_extra_state" not in k]
                    assert len(experts) == 4 * 2, (prefix, experts)  # 4 local experts x fc1/fc2
                    for j in range(4):
                        e, base = 4 * ep + j, f"model.layers.{hf_layer}.mlp.experts.{4 * ep + j}."
                        fc = (lambda i: f"{prefix}mlp.experts.linear_fc{i}.weight{j}") if grouped else \
                            (lambda i: f"{prefix}mlp.experts.local_experts.{j}.linear_fc{i}.weight")
                        gate, up = (hf[base + f"{p}_proj.weight"].chunk(2)[tp] for p in ("gate", "up"))
                        assert torch.equal(model[fc(1)], torch.cat([gate, up])), (prefix, e)
                        assert torch.equal(model[fc(2)], hf[base + "down_proj.weight"].chunk(2, dim=1)[tp]), (prefix, e)
                        seen[hf_layer, e] += 1
    assert seen == {(layer, e): 2 for layer in (1, 2, 3, 4) for e in range(8)}  # each once per TP rank


def test_bf16_source_is_bit_exact_through_ep_reshards(tiny_hf, tmp_path: Path) -> None:
    """bf16 weights and the MTP layer: EP=4 -> TP=2 x EP=2 grouped -> PP=2 x TP=2 x EP=8 (ETP=1) -> HF, every byte."""
    src = tiny_hf("glm4.5-air", dtype=torch.bfloat16)
    a = import_hf(src, tmp_path / "ep4", ParallelLayout(ep=4))
    b = reshard(a, tmp_path / "tp2ep2g", ParallelLayout(tp=2, ep=2, moe_grouped_gemm=True))
    c = reshard(b, tmp_path / "pp2ep8", ParallelLayout(pp=2, ep=8, tp=2, etp=1))
    out = export_hf(c, tmp_path / "hf")
    assert_identical(src, out)
    assert any(k.startswith(MTP) for k in read_all(out))


def test_mtp_copy_of_the_embedding_must_equal_it(tiny_hf, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The MTP layer's embed_tokens is stored apart in the HF checkpoint, Megatron's MTP shares the model's: a copy that
    differs cannot be kept, and import says so in one line."""
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf("glm4.5-air"), src)
    tensors = load_file(src / "model.safetensors")
    tensors[MTP + "embed_tokens.weight"][3, 5] += 1.0
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["import", str(src), "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip()
    assert "embed_tokens or shared_head.head differs from the model's embedding" in err and len(err.splitlines()) == 1


def test_checkpoint_without_the_mtp_copies_round_trips_without_them(tiny_hf, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """Some checkpoints (GLM-4.6's, an HF export of Megatron-Bridge's) store no MTP `embed_tokens`/`shared_head.head`:
    such a folder imports, and exports back without them, bit for bit; one with only some of them is refused by
    name."""
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf("glm4.5-air"), src)
    tensors = load_file(src / "model.safetensors")
    without = {k: v for k, v in tensors.items() if k not in (MTP + "embed_tokens.weight", MTP + "shared_head.head.weight")}
    save_file(without, src / "model.safetensors", metadata={"format": "pt"})
    ckpt = import_hf(src, tmp_path / "m", ParallelLayout(ep=2))
    assert json.loads((ckpt / "bridge.json").read_text())["config"]["mtp_shared_copies"] is False
    assert_identical(src, export_hf(ckpt, tmp_path / "back"))
    save_file({**without, MTP + "embed_tokens.weight": tensors[MTP + "embed_tokens.weight"]}, src / "model.safetensors",
              metadata={"format": "pt"})
    assert main(["import", str(src), "--out", str(tmp_path / "partial")]) == 1
    assert f"missing 1: {MTP}shared_head.head.weight" in capsys.readouterr().err


def test_a_rank_file_missing_an_mtp_tensor_does_not_load(tiny_hf, tmp_path: Path) -> None:
    """The MTP entries are set aside on load only when all of them are there; otherwise loading names them."""
    from bridge.checkpoint import CheckpointMeta
    from bridge.converters.megatron_legacy import LegacyCheckpointReader
    from bridge.nn import build_model_chunks, load_rank_checkpoint
    from bridge.parallel.state import ParallelState

    ckpt = import_hf(tiny_hf("glm4.5-air"), tmp_path / "c")
    meta = CheckpointMeta.load(ckpt)
    state = LegacyCheckpointReader(ckpt, meta.layout).load_rank(0, 0)
    chunks = build_model_chunks(meta.config, ParallelState(meta.layout, 1, 0))
    load_rank_checkpoint(chunks, state)
    assert "mtp.layers.0.eh_proj.weight" in chunks[0].carried and "mtp.layers.0.eh_proj.weight" not in chunks[0].state_dict()
    del state["model"]["mtp.layers.0.enorm.weight"]
    with pytest.raises(BridgeError, match=r"unexpected \['mtp\.layers\.0\."):
        load_rank_checkpoint(build_model_chunks(meta.config, ParallelState(meta.layout, 1, 0)), state)


def test_mtp_training_is_refused_and_carried(tiny_hf, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Megatron's --mtp-num-layers and a torch_dist save (which would drop the MTP layer) stop in one line before any
    process starts; random initialisation from the config builds no MTP layer."""
    src = tiny_hf("glm4.5-air")
    ckpt = import_hf(src, tmp_path / "c")
    common = ["train", "--load", str(ckpt), "--mock-data", "--seq-length", "32"]
    for flags, message in ((["--mtp-num-layers", "1"], "--mtp-num-layers 1: bridge does not train multi-token"),
                           (["--ckpt-format", "torch_dist"], "--ckpt-format torch_dist would drop Glm4MoeForCausalLM's 1 MTP")):
        assert main([*common, *flags]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    plan = make_plan(TrainConfig(model_config=str(src), mock_data=True, seq_length=32))
    assert plan.model.mtp_layers == 0 and plan.model.moe is not None


# --- logits against transformers ------------------------------------------------------------------------------------

def _mutated(monkeypatch: pytest.MonkeyPatch, tails: tuple[str, ...],
             edit: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
    """Import GLM-4.5 with a mapping whose Megatron tensors ending in one of `tails` are `edit`ed after the right
    transform."""
    from bridge.models import FAMILIES, Family

    original = FAMILIES[ARCH]

    def rows(cfg: Any) -> list:
        def wrap(t: Transform) -> Transform:
            return Transform(t.name, lambda *args: edit(t.to_megatron(*args), args[-1]), t.to_hf)
        return [replace(r, transform=wrap(r.transform)) if r.megatron.endswith(tails) else r for r in original.rows(cfg)]

    monkeypatch.setitem(FAMILIES, ARCH, Family(ARCH, original.config_from_hf, rows))


def _qk_channels(order: Callable[[int], torch.Tensor]) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """Permute every q and k head's channels of a fused linear_qkv (weight and bias alike) by `order(head_dim)`: the
    scores q.k do not change, but where rotated channels move, the model rotates other channels (or pairs them
    otherwise) than transformers does."""
    def edit(qkv: torch.Tensor, cfg: Any) -> torch.Tensor:
        d, per_group = cfg.kv_channels, cfg.heads_per_group + 2
        heads = qkv.reshape(cfg.num_query_groups, per_group, d, *qkv.shape[1:]).clone()
        heads[:, :per_group - 1] = heads[:, :per_group - 1, order(d)]  # q heads and k, not v
        return heads.reshape(qkv.shape)
    return edit


QKV = ("linear_qkv.weight", "linear_qkv.bias")
#: Checkpoints verify must fail, with the mapping edits that make them (the Megatron tensors' tails, the edit).
BROKEN: dict[str, tuple[tuple[str, ...], Callable[[torch.Tensor, Any], torch.Tensor]]] = {
    # HF rotates the first half of each head's channels: the second half rotates instead
    "rotary-wrong-half": (QKV, _qk_channels(lambda d: torch.arange(d).roll(d // 2))),
    # the rotated half in interleaved pairs (0, 1), (2, 3), ... where HF's rotate_half pairs i with i + d/4
    "rotary-interleaved": (QKV, _qk_channels(
        lambda d: torch.cat([torch.arange(d // 2).view(-1, 2).t().flatten(), torch.arange(d // 2, d)]))),
    "no-qkv-bias": (("linear_qkv.bias",), lambda t, cfg: torch.zeros_like(t)),
    "no-correction-bias": (("router.expert_bias",), lambda t, cfg: torch.zeros_like(t)),
}
#: An edit that must still pass: the channels that do not rotate, permuted among themselves (so the failures above
#: come from the rotation, not from the permutation).
CONTROL = {"pass-through-permuted": (QKV, _qk_channels(lambda d: torch.cat([torch.arange(d // 2),
                                                                          torch.arange(d // 2, d).flip(0)])))}
LAYOUTS = {"ep2-tp2": ParallelLayout(ep=2, tp=2), "pp2-ep2-grouped": ParallelLayout(pp=2, ep=2, moe_grouped_gemm=True)}


@pytest.fixture(scope="module")
def references(tiny_hf) -> dict[str, tuple[Path, list[torch.Tensor]]]:
    """GLM-4.5-Air's block (no q/k norms) and GLM-4.5's (q/k norms), each with transformers' logits."""
    folders = {"glm4.5-air": tiny_hf("glm4.5-air"), "glm4.5-qk-norm": tiny_hf("glm4.5-air", use_qk_norm=True)}
    return {key: (folder, hf_logits(folder, TOKENS, "fp32", "cpu")) for key, folder in folders.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_logits_match_transformers_and_broken_mappings_fail(name: str, references: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    layout = LAYOUTS[name]
    ckpts = {key: import_hf(folder, tmp_path / key, layout) for key, (folder, _) in references.items()}
    if name == "ep2-tp2":
        for key, (tails, edit) in {**BROKEN, **CONTROL}.items():
            with monkeypatch.context() as patch:
                _mutated(patch, tails, edit)
                ckpts[key] = import_hf(references["glm4.5-air"][0], tmp_path / key, layout)
    for key, logits in zip(ckpts, sharded_logits(list(ckpts.values()), TOKENS)):
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, references.get(key, references["glm4.5-air"])[1],
                                                logits, "fp32")
        print(f"{name:16} {key:20} max abs {overall.max_abs:.3e} top-1 {overall.top1:.1%} {'PASS' if passed else 'FAIL'}")
        assert passed == (key not in BROKEN), f"{key} at {name}: {criterion}"


def test_config_reads_glm_fields(tiny_hf) -> None:
    """What the family reads from config.json: qkv bias, q/k norms, partial rotary, the dense first layer, the MTP
    layer, and DeepSeek-V3's router fields."""
    from bridge.api import load_hf_config

    cfg = load_hf_config(tiny_hf("glm4.5-air", use_qk_norm=True))
    moe = cfg.moe
    assert (cfg.add_qkv_bias, cfg.qk_layernorm, cfg.rotary_percent, cfg.kv_channels) == (True, True, 0.5, 16)
    assert (cfg.mtp_layers, moe.moe_layers, moe.score_function, moe.expert_bias) == (1, (1, 2, 3), "sigmoid", True)
    assert (moe.num_groups, moe.group_topk) == (2, 1)
    assert (moe.topk_scaling_factor, moe.normalize_topk, moe.shared_expert_ffn_hidden_size) == (2.5, True, 32)
    assert json.loads(json.dumps(cfg.to_json()))["mtp_layers"] == 1
