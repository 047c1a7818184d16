"""Logit parity of bridge.nn against transformers over spawned gloo ranks, and `bridge verify` failing when it must.

One spawned group per layout checks every architecture at once (start-up dominates the cost).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from bridge.api import import_hf
from bridge.cli.main import main
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from bridge.apps.verify import DEFAULT_PROMPTS, compare, encode, hf_logits, read_prompts, sharded_logits, verify
from tests.model_fixtures import PARITY_LAYOUTS, PARITY_MODELS, load_pt

LAYOUTS = PARITY_LAYOUTS
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tiny_hf) -> dict[str, tuple[Path, list[torch.Tensor]]]:
    """Tiny HF models and their fp32 reference logits on the default prompts."""
    return {key: (tiny_hf(name), hf_logits(tiny_hf(name), TOKENS, "fp32", "cpu")) for key, name in PARITY_MODELS.items()}


TOKENS = encode(Path("/nonexistent"), DEFAULT_PROMPTS, 300)


def _swap_qk_rows(ckpt: Path, rank_dir: str) -> None:
    """Break one rank: swap the q rows of head 0 with the k rows of group 0 in layer 1's linear_qkv."""
    path = ckpt / "release" / rank_dir / "model_optim_rng.pt"
    state = load_pt(path)
    key = next(k for k in state["model"] if k.endswith("1.self_attention.linear_qkv.weight"))
    w = state["model"][key]
    hpg = 2  # tiny models: 8 heads, 4 query groups; a TP=2 shard holds 2 groups of (hpg + 2) * d rows
    d = w.shape[0] // (2 * (hpg + 2))
    q0, k0 = w[:d].clone(), w[hpg * d:(hpg + 1) * d].clone()
    w[:d], w[hpg * d:(hpg + 1) * d] = k0, q0
    torch.save(state, path)


#: Checkpoints broken on purpose (verify must fail them) -> the model whose logits they are compared with.
BROKEN = {"broken": "llama-untied", "smollm3-rope-everywhere": "smollm3", "phi3-v-for-k": "phi3",
          "gemma2-pre-post-swapped": "gemma2", "gemma2-no-embedding-scale": "gemma2",
          "gemma2-no-attention-softcap": "gemma2", "gemma2-no-final-softcap": "gemma2",
          "gemma3-one-rope-table": "gemma3", "olmo2-post-norms-swapped": "olmo2"}


def _edit_config(ckpt: Path, edit: Callable[[dict], None]) -> Path:
    """A checkpoint whose bridge.json config is edited: the tensors are right, the model read from it is not."""
    meta_file = ckpt / "bridge.json"
    meta = json.loads(meta_file.read_text())
    edit(meta["config"])
    meta_file.write_text(json.dumps(meta))
    return ckpt


def _swapped_rows(architecture: str, a: str, b: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Import `architecture` with a mapping that reads HF tensor `a` where `b` belongs and back."""
    from bridge.models import FAMILIES, Family

    original = FAMILIES[architecture]
    swap = {a: b, b: a}

    def rows(cfg: Any) -> list:
        return [replace(r, hf=tuple(next((n.replace(k, v) for k, v in swap.items() if k in n), n) for n in r.hf))
                for r in original.rows(cfg)]

    monkeypatch.setitem(FAMILIES, architecture, Family(architecture, original.config_from_hf, rows))


def _drop_layer_field(name: str) -> Callable[[dict], None]:
    return lambda config: [spec.pop(name, None) for spec in config["layers"]]


def _broken_checkpoints(models: dict, tmp_path: Path, layout: ParallelLayout,
                        monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A swap of q and k rows in one rank file; SmolLM3 without its layer specs (RoPE in the NoPE layers); Phi-3
    imported with a mapping that reads v where k is."""
    from bridge import transforms
    from bridge.mapping import Transform
    from bridge.models import phi3

    ckpts = {"broken": import_hf(models["llama-untied"][0], tmp_path / "broken", layout)}
    _swap_qk_rows(ckpts["broken"], "mp_rank_01")
    ckpts["smollm3-rope-everywhere"] = import_hf(models["smollm3"][0], tmp_path / "smollm3-rope", layout)
    meta_file = ckpts["smollm3-rope-everywhere"] / "bridge.json"
    meta = json.loads(meta_file.read_text())
    del meta["config"]["layers"]
    meta_file.write_text(json.dumps(meta))

    def v_for_k(qkv: torch.Tensor, cfg: Any) -> torch.Tensor:
        d = cfg.kv_channels
        q, k, v = qkv.split([cfg.num_attention_heads * d, cfg.num_query_groups * d, cfg.num_query_groups * d])
        return transforms.fuse_qkv(q, v, k, cfg)

    monkeypatch.setattr(phi3, "FUSED_QKV", Transform("fused_qkv", v_for_k, phi3.FUSED_QKV.to_hf))
    ckpts["phi3-v-for-k"] = import_hf(models["phi3"][0], tmp_path / "phi3-v-for-k", layout)
    ckpts.update(_broken_block_shapes(models, tmp_path, layout, monkeypatch))
    return ckpts


def _broken_block_shapes(models: dict, tmp_path: Path, layout: ParallelLayout,
                         monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Gemma 2 imported with its post-attention and pre-MLP norms swapped, or read without its embedding scale or
    either softcap; Gemma 3 with every layer on the global RoPE table; OLMo 2 with its two post-norms swapped."""
    edits = {"gemma2-no-embedding-scale": lambda config: config.pop("embedding_multiplier"),
             "gemma2-no-attention-softcap": _drop_layer_field("attention_softcap"),
             "gemma2-no-final-softcap": lambda config: config.pop("final_logit_softcap"),
             "gemma3-one-rope-table": _drop_layer_field("local_rope")}
    ckpts = {key: _edit_config(import_hf(models[BROKEN[key]][0], tmp_path / key, layout), edit)
             for key, edit in edits.items()}
    _swapped_rows("Gemma2ForCausalLM", "post_attention_layernorm", "pre_feedforward_layernorm", monkeypatch)
    _swapped_rows("Olmo2ForCausalLM", "post_attention_layernorm", "post_feedforward_layernorm", monkeypatch)
    for key in ("gemma2-pre-post-swapped", "olmo2-post-norms-swapped"):
        ckpts[key] = import_hf(models[BROKEN[key]][0], tmp_path / key, layout)
    return ckpts


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_logits_match_transformers_fp32(models: dict, tmp_path: Path, layout: ParallelLayout,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ckpts = {key: import_hf(folder, tmp_path / key, layout) for key, (folder, _) in models.items()}
    if layout.tp == 2 and layout.pp == 2:  # the local spec too
        for key in ("llama-tied", "qwen2"):
            ckpts[f"{key}-local"] = import_hf(models[key][0], tmp_path / f"{key}-local", layout, transformer_impl="local")
    if layout.tp == 2 and layout.pp == 1:  # and broken ones, to see the check can fail
        ckpts.update(_broken_checkpoints(models, tmp_path, layout, monkeypatch))
    ours = dict(zip(ckpts, sharded_logits(list(ckpts.values()), TOKENS)))
    for key, logits in ours.items():
        ref = models[BROKEN.get(key, key.removesuffix("-local"))][1]
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, ref, logits, "fp32")
        print(f"{layout.name:14} {key:14} max abs {overall.max_abs:.3e} mean abs {overall.mean_abs:.3e} "
              f"top-1 {overall.top1:.1%} {'PASS' if passed else 'FAIL'}")
        assert passed == (key not in BROKEN), f"{key} at {layout.name}: {criterion}"


def test_sequence_parallel_logits_match(models: dict, tmp_path: Path) -> None:
    layout = ParallelLayout(tp=2, pp=2)
    keys = ("llama-untied", "qwen3")
    ckpts = [import_hf(models[k][0], tmp_path / k, layout) for k in keys]
    tokens = [t[: len(t) // 2 * 2] for t in TOKENS]
    for key, logits in zip(keys, sharded_logits(ckpts, tokens, sequence_parallel=True)):
        ref = [r[: len(t)] for r, t in zip(models[key][1], tokens)]
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, ref, logits, "fp32")
        print(f"tp2-pp2 (SP)   {key:14} max abs {overall.max_abs:.3e}")
        assert passed, criterion


def test_cli_passes_and_writes_verify_json(models: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = import_hf(models["qwen2"][0], tmp_path / "ok", ParallelLayout())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n\nsecond prompt here\n")
    assert main(["verify", str(models["qwen2"][0]), str(ckpt), "--prompts", str(prompts)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "second prompt here" in out
    report = json.loads((ckpt / "verify.json").read_text())
    assert report["passed"] is True and len(report["prompts"]) == 2 and report["max_abs_diff"] < 1e-6


def test_cli_fails_on_gate_up_swapped_on_one_rank(models: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = import_hf(models["qwen3"][0], tmp_path / "bad", ParallelLayout(tp=2))
    path = ckpt / "release" / "mp_rank_01" / "model_optim_rng.pt"
    state = load_pt(path)
    fc1 = state["model"]["decoder.layers.2.mlp.linear_fc1.weight"]
    gate, up = fc1.chunk(2)
    state["model"]["decoder.layers.2.mlp.linear_fc1.weight"] = torch.cat([up, gate])
    torch.save(state, path)
    assert main(["verify", str(models["qwen3"][0]), str(ckpt)]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert json.loads((ckpt / "verify.json").read_text())["passed"] is False


def test_user_errors_before_any_process_starts(models: dict, tmp_path: Path) -> None:
    ckpt = import_hf(models["qwen2"][0], tmp_path / "q", ParallelLayout())
    with pytest.raises(BridgeError, match="is not the model of"):
        verify(models["llama-tied"][0], ckpt)
    with pytest.raises(BridgeError, match="--dtype"):
        verify(models["qwen2"][0], ckpt, dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(BridgeError, match="no CUDA GPU"):
            verify(models["qwen2"][0], ckpt, device="cuda")
    with pytest.raises(BridgeError, match="prompts file"):
        read_prompts(tmp_path / "none.txt")


FLAT_CKPTS = ("exact", "heads-swapped", "norm-x1.1")


@pytest.fixture(scope="module")
def flat(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama whose bf16 top-1 is fragile (init std 0.3: rounding grows through the layers, so transformers'
    own bf16 run picks the fp32 token on only ~91% of the positions), imported at TP=2 as it is and broken two
    ways; bridge's bf16 logits of all three from one start of the ranks."""
    hf = tiny_hf("llama32-tied", initializer_range=0.3)
    tmp = tmp_path_factory.mktemp("flat")
    ckpts = {key: import_hf(hf, tmp / key, ParallelLayout(tp=2)) for key in FLAT_CKPTS}
    _edit(ckpts["heads-swapped"], "mp_rank_01", "1.self_attention.linear_proj.weight", _swap_first_two_heads)
    _edit(ckpts["norm-x1.1"], "mp_rank_00", "2.mlp.linear_fc1.layer_norm_weight", lambda w: w * 1.1)
    ours = dict(zip(FLAT_CKPTS, sharded_logits([ckpts[k] for k in FLAT_CKPTS], TOKENS, dtype="bf16")))
    return {"hf": hf, "ckpts": ckpts, "bridge": ours}


def _edit(ckpt: Path, rank_dir: str, suffix: str, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    path = ckpt / "release" / rank_dir / "model_optim_rng.pt"
    state = load_pt(path)
    key = next(k for k in state["model"] if k.endswith(suffix))
    state["model"][key] = change(state["model"][key])
    torch.save(state, path)


def _swap_first_two_heads(w: torch.Tensor, head_dim: int = 16) -> torch.Tensor:
    """linear_proj reads the attention outputs of its first two heads crosswise (tiny models: head_dim 16)."""
    return torch.cat([w[:, head_dim:2 * head_dim], w[:, :head_dim], w[:, 2 * head_dim:]], dim=1)


def test_bf16_judged_against_transformers_own_bf16(flat: dict) -> None:
    """The exact conversion passes though its bf16 top-1 is far below 99% (the old bar, bridge bf16 against
    transformers bf16, fails it); both broken ones fail. References: transformers fp32 and bf16 computed here."""
    ref, hf_bf16 = (hf_logits(flat["hf"], TOKENS, dtype, "cpu") for dtype in ("fp32", "bf16"))
    old_rule = (torch.cat(flat["bridge"]["exact"]).argmax(-1) == torch.cat(hf_bf16).argmax(-1)).float().mean().item()
    assert old_rule < 0.99, f"the case no longer shows the old rule failing an exact conversion: {old_rule:.1%}"
    hf_top1 = (torch.cat(hf_bf16).argmax(-1) == torch.cat(ref).argmax(-1)).float().mean().item()
    assert hf_top1 < 0.95, hf_top1
    for key, logits in flat["bridge"].items():
        _, overall, passed, criterion = compare(DEFAULT_PROMPTS, ref, logits, "bf16", hf_bf16)
        print(f"{key:14} {'PASS' if passed else 'FAIL'}: {criterion}")
        assert passed == (key == "exact"), f"{key}: {criterion}"
        assert f"top-1 vs fp32 {overall.top1:.1%}" in criterion and f"transformers bf16's {hf_top1:.1%}" in criterion


def test_cli_bf16_prints_both_agreements(flat: dict, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    """`bridge verify --dtype bf16` end to end, but for the ranks: their logits are the fixture's, for the same
    checkpoint and tokens (one start of the ranks fewer)."""
    ckpt = flat["ckpts"]["exact"]

    def ranks(checkpoints: list[Path], tokens: list[list[int]], **kwargs: Any) -> list[list[torch.Tensor]]:
        assert list(map(Path, checkpoints)) == [ckpt] and tokens == TOKENS and kwargs["dtype"] == "bf16"
        return [flat["bridge"]["exact"]]

    monkeypatch.setattr("bridge.apps.verify.sharded_logits", ranks)
    assert main(["verify", str(flat["hf"]), str(ckpt), "--dtype", "bf16"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    report = json.loads((ckpt / "verify.json").read_text())
    assert report["passed"] is True and report["top1_agreement"] < 0.99 and report["hf_bf16_top1_agreement"] < 0.95
    overall, hf_row = (line for line in out.splitlines() if line.startswith(("all prompts", "transformers bf16")))
    assert f"{report['top1_agreement']:.1%}" in overall and f"{report['hf_bf16_top1_agreement']:.1%}" in hf_row
    assert f"{report['mean_abs_diff']:.3e}" in overall and f"{report['hf_bf16_mean_abs_diff']:.3e}" in hf_row
    assert out.splitlines()[-1].startswith("PASS: top-1 vs fp32 ")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_verify_nccl_bf16_tp2(models: dict, tmp_path: Path) -> None:
    ckpt = import_hf(models["llama-tied"][0], tmp_path / "g", ParallelLayout(tp=2), dtype="bf16")
    result = verify(models["llama-tied"][0], ckpt, dtype="bf16", device="cuda")
    assert result.overall.cosine > 0.999, result.table()
