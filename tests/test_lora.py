"""LoRA and DoRA on CPU/gloo, fp32, tiny Llama, Qwen3, Mixtral, Phi-3 and Gemma 2, judged by peft and transformers:
- TP=2 with SP and the distributed optimizer over DP=2, and PP=2, give the single-process losses (1e-5 relative)
  and the same adapter; DoRA the same at TP=2;
- Mixtral's routed experts' adapters at EP=2 the same;
- the adapter exported as a PEFT folder, loaded by peft on the HF base without a missing/unexpected-key warning,
  gives the logits of the merged export loaded by plain transformers, and both differ from the base;
- the checkpoint holds the adapter and its optimizer state only, the base checkpoint stays bitwise unchanged, a run
  stopped and resumed gives the uninterrupted losses exactly;
- a folder written by peft itself imports and exports back to the same tensors, and trains;
- bad input is one line."""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from bridge.api import import_hf
from bridge.apps.adapter import export_adapter, export_merged, read_adapter, to_peft
from bridge.cli.main import main
from bridge.training import TrainConfig, train
from tests.model_fixtures import load_pt, write_random_corpus

pytestmark = pytest.mark.slow

LR = 2e-2
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora")
    hf = {name: tiny_hf(name) for name in ("llama31", "qwen3", "mixtral", "phi3", "gemma2")}
    ckpt = {name: import_hf(folder, root / f"ckpt-{name}") for name, folder in hf.items()}
    return {"root": root, "hf": hf, "ckpt": ckpt, "digest": {n: _digest(c) for n, c in ckpt.items()},
            "data": write_random_corpus(root / "corpus", seed=0, documents=60), "runs": {}}


def run(env: dict[str, Any], model: str, name: str, **kw: Any) -> dict[str, Any]:
    """Train (once per module) a LoRA run of 5 fp32 steps; its summary and folder."""
    key = f"{model}-{name}"
    if key not in env["runs"]:
        save = env["root"] / "runs" / key
        base = dict(load=str(env["ckpt"][model]), data_path=[str(env["data"])], micro_batch_size=2, global_batch_size=4,
                    seq_length=32, train_iters=5, lr=LR, eval_interval=0, eval_iters=1, progress=False,
                    save=str(save), device="cpu", nproc=1, lora_rank=4, lora_alpha=8.0)
        env["runs"][key] = {"summary": train(TrainConfig(**{**base, **kw})), "save": save}
    return env["runs"][key]


def _losses(summary: dict[str, Any]) -> list[float]:
    return [loss for _, loss in summary["loss_curve"]]


def _adapter(env: dict[str, Any], key: str) -> dict[str, torch.Tensor]:
    out = env["root"] / "exports" / f"{key}-adapter"
    if not out.is_dir():
        export_adapter(env["runs"][key]["save"], out)
    return load_file(out / "adapter_model.safetensors")


@pytest.mark.parametrize("model, name, layout", [
    ("llama31", "tp2-sp-dp2-distopt", dict(nproc=4, tp=2, sequence_parallel=True, use_distributed_optimizer=True)),
    ("llama31", "pp2", dict(nproc=2, pp=2)),
    ("qwen3", "dora-tp2-sp", dict(nproc=2, tp=2, sequence_parallel=True, lora_use_dora=True)),
    ("mixtral", "ep2", dict(nproc=2, ep=2)),  # the routed experts' adapters split over EP
])
def test_layout_matches_single_process(env: dict[str, Any], model: str, name: str, layout: dict[str, Any]) -> None:
    dora = dict(lora_use_dora=True) if layout.get("lora_use_dora") else {}
    ref = run(env, model, "dora-single" if dora else "single", **dora)
    got = run(env, model, name, **layout)
    rel = max(abs(a - b) / abs(b) for a, b in zip(_losses(got["summary"]), _losses(ref["summary"])))
    print(f"{model} {name}: max relative loss difference {rel:.2e}")
    assert len(_losses(got["summary"])) == 5 and rel <= 1e-5
    ours, theirs = _adapter(env, f"{model}-{name}"), _adapter(env, f"{model}-{'dora-single' if dora else 'single'}")
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    print(f"{model} {name}: max |adapter difference| {worst:.2e}")
    # Adam divides by sqrt(v): where a gradient is ~0, reduction-order noise moves a weight by a fraction of one step
    # (lr); 1% of a step, as tests/test_train_parallel.py allows
    assert worst <= 0.01 * LR
    assert any(theirs[k].abs().max() > 0 for k in theirs if "lora_B" in k)  # the adapter learned something


def _logits(env: dict[str, Any], model: str, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(base, peft adapter, merged) logits of one batch, and peft's warnings about keys."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = env["root"] / "exports"
    merged_dir = folder / f"{key}-merged"
    if not merged_dir.is_dir():
        export_merged(env["runs"][key]["save"], merged_dir)
    _adapter(env, key)
    tokens = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(env["hf"][model], dtype=torch.float32)
    with torch.no_grad():
        plain = base(tokens).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adapted = PeftModel.from_pretrained(base, folder / f"{key}-adapter")
        keys = [str(w.message) for w in caught if "key" in str(w.message).lower()]
        with_adapter = adapted(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(tokens).logits
    return plain, with_adapter, merged, keys


@pytest.mark.parametrize("model, name, layout", [
    ("llama31", "tp2-sp-dp2-distopt", dict(nproc=4, tp=2, sequence_parallel=True, use_distributed_optimizer=True)),
    ("qwen3", "dora-tp2-sp", dict(nproc=2, tp=2, sequence_parallel=True, lora_use_dora=True)),
    ("mixtral", "ep2", dict(nproc=2, ep=2)),
    ("phi3", "tp2", dict(nproc=2, tp=2)),      # HF's fused qkv_proj and gate_up_proj: one peft module each
    ("gemma2", "tp2", dict(nproc=2, tp=2)),    # post-norms after o_proj and down_proj, GeGLU, softcaps
])
def test_peft_adapter_gives_the_merged_export(env: dict[str, Any], model: str, name: str, layout: dict[str, Any]) -> None:
    run(env, model, name, **layout)
    plain, with_adapter, merged, warned = _logits(env, model, f"{model}-{name}")
    assert warned == []
    scale = merged.abs().max().item()
    diff = (with_adapter - merged).abs().max().item()
    print(f"{model} {name}: peft vs merged {diff / scale:.2e} of the logit scale")
    assert diff <= 1e-5 * scale
    assert (merged - plain).abs().max().item() > 1e-3 * scale


def _live_losses(pairs: list[tuple[str, str]]) -> list[torch.Tensor]:
    """In a launched rank: per-token losses of bridge's own model, base checkpoint + the run's adapter, per pair."""
    from bridge.checkpoint import CheckpointMeta
    from bridge.converters.megatron_legacy import LegacyCheckpointReader
    from bridge.nn.lora import apply_lora, load_adapter_state
    from bridge.training.lora_run import read_lora
    from tests.model_fixtures import rank_model

    tokens = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(2))
    out = []
    for base, save in pairs:
        _, chunks = rank_model(base, 1, mask_padded_vocab=True)
        apply_lora(chunks, read_lora(save)[0])
        meta = CheckpointMeta.load(Path(save))
        load_adapter_state(chunks, [LegacyCheckpointReader(Path(save), meta.layout).load_rank(0, 0)["model"]])
        with torch.no_grad():
            out.append(chunks[0](tokens[:, :-1], labels=tokens[:, 1:]))  # [b, s]
    return out


def test_live_adapter_computes_the_merged_model(env: dict[str, Any]) -> None:
    """bridge's model with the adapter (as it trained) against transformers on the merged export."""
    from transformers import AutoModelForCausalLM

    from bridge.launch import launch

    keys = [("llama31", "single", {}), ("qwen3", "dora-single", dict(lora_use_dora=True)), ("mixtral", "single", {})]
    for model, name, kw in keys:
        run(env, model, name, **kw)
    pairs = [(str(env["ckpt"][m]), str(env["runs"][f"{m}-{n}"]["save"])) for m, n, _ in keys]
    (live,) = launch(_live_losses, 1, pairs)
    tokens = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(2))
    for (model, name, _), ours in zip(keys, live):
        merged = env["root"] / "exports" / f"{model}-{name}-merged"
        if not merged.is_dir():
            export_merged(env["runs"][f"{model}-{name}"]["save"], merged)
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(tokens[:, :-1]).logits
            theirs = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        print(f"{model} {name}: max |per-token loss difference| {(ours - theirs).abs().max().item():.2e}")
        assert (ours - theirs).abs().max().item() <= 1e-5


def test_checkpoint_is_the_adapter_and_the_base_is_untouched(env: dict[str, Any]) -> None:
    single = run(env, "llama31", "single")
    rank_file = single["save"] / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt"
    state = load_pt(rank_file)
    names = set(state["model"])
    assert names and all(".adapter.linear_" in n for n in names)
    assert set(state["optimizer"]["params"]) == {f"model.{n}" for n in names}
    numel = sum(t.numel() for t in state["model"].values())
    base_bytes = sum(p.stat().st_size for p in env["ckpt"]["llama31"].rglob("*.pt"))
    saved = sum(p.stat().st_size for p in (single["save"] / "iter_0000005").rglob("*") if p.is_file())
    assert saved <= 4 * 4 * numel + 64 * 1024 < base_bytes  # weights, master, two moments (fp32) and the entries
    assert json.loads((single["save"] / "lora.json").read_text())["base"] == str(env["ckpt"]["llama31"].resolve())
    for model in env["ckpt"]:
        assert _digest(env["ckpt"][model]) == env["digest"][model], model


def test_resume_is_exact(env: dict[str, Any]) -> None:
    full = run(env, "llama31", "single")
    stopped = run(env, "llama31", "stopped", exit_interval=3)
    assert len(_losses(stopped["summary"])) == 3
    resumed = train(TrainConfig(load=str(stopped["save"]), data_path=[str(env["data"])], micro_batch_size=2,
                                global_batch_size=4, seq_length=32, train_iters=5, lr=LR, eval_interval=0,
                                eval_iters=1, progress=False, save=str(stopped["save"]), device="cpu", nproc=1))
    assert _losses(resumed) == _losses(full["summary"])


@pytest.mark.parametrize("model, targets, dora", [
    ("qwen3", ALL_LINEARS, True),
    ("llama31", ["q_proj", "v_proj"], False),  # peft's default targets: k_proj, part of linear_qkv, left out
])
def test_import_of_a_folder_peft_wrote_round_trips_and_trains(env: dict[str, Any], model: str, targets: list[str],
                                                              dora: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = env["root"] / f"import-{model}"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(env["hf"][model]),
                                LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:  # peft starts B at zero: give the round trip something to carry
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(root / "peft")
    assert main(["import", "--adapter", str(root / "peft"), "--base", str(env["ckpt"][model]), "--tp", "2",
                 "--out", str(root / "run")]) == 0
    imported = root / "run"
    export_adapter(imported, root / "back")
    theirs, ours = load_file(root / "peft" / "adapter_model.safetensors"), load_file(root / "back" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert sorted(json.loads((root / "back" / "adapter_config.json").read_text())["target_modules"]) == sorted(targets)
    summary = train(TrainConfig(load=str(imported), data_path=[str(env["data"])], micro_batch_size=2, global_batch_size=4,
                                seq_length=32, train_iters=2, lr=2e-2, eval_interval=0, eval_iters=1, progress=False,
                                save=str(root / "continued"), device="cpu", nproc=2, tp=2))
    assert summary["iterations"] == 2
    export_adapter(root / "continued", root / "continued-adapter")
    trained = load_file(root / "continued-adapter" / "adapter_model.safetensors")
    assert trained.keys() == theirs.keys() and all(not torch.equal(trained[k], theirs[k]) for k in theirs if "lora_B" in k)
    spec, _, meta, tensors = read_adapter(root / "continued")
    whole = to_peft(meta.config, dataclasses.replace(spec, absent_parts=()), tensors)  # the parts left out too
    assert [k for k in whole if k not in trained] == [k for k in whole if "k_proj" in k and not whole[k].any()]


def _one_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line(env: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    llama, mixtral = str(env["ckpt"]["llama31"]), str(env["ckpt"]["mixtral"])
    train_args = ["train", "--mock-data", "--seq-length", "16", "--device", "cpu", "--nproc", "1"]
    assert main([*train_args, "--load", llama, "--lora-rank", "0"]) == 1
    assert "--lora-rank must be >= 1, got 0" in _one_line(capsys)
    assert main([*train_args, "--load", llama, "--lora-rank", "4", "--lora-target-modules", "q_proj"]) == 1
    assert "q_proj matches no adaptable linear; choose from linear_qkv" in _one_line(capsys)
    assert main([*train_args, "--load", mixtral, "--lora-rank", "4", "--tp", "2", "--nproc", "2"]) == 1
    assert "adapts MixtralForCausalLM's routed experts, which bridge does with neither --tp > 1" in _one_line(capsys)
    assert main(["export", llama, "--out", str(tmp_path / "a"), "--adapter"]) == 1
    assert "has no adapter (lora.json): it was not trained with --lora-rank" in _one_line(capsys)
    model = _saved_peft(env, tmp_path, "llama31", ["q_proj", "v_proj"], use_dora=True)  # k_proj left out
    capsys.readouterr()  # transformers' loading bars
    assert main(["import", "--adapter", str(model), "--base", llama, "--out", str(tmp_path / "b")]) == 1
    assert "is a DoRA adapter on some of the linears fused into linear_qkv" in _one_line(capsys)
    model = _saved_peft(env, tmp_path, "qwen3", ALL_LINEARS)
    capsys.readouterr()
    assert main(["import", "--adapter", str(model), "--base", llama, "--out", str(tmp_path / "c")]) == 1
    assert "base model does not match the checkpoint" in _one_line(capsys)
    assert not any(p.name.startswith(("b", "c")) for p in tmp_path.iterdir())
    moved = tmp_path / "moved"  # a run whose base has since moved on to another iteration
    shutil.copytree(run(env, "llama31", "single")["save"], moved)
    record = json.loads((moved / "lora.json").read_text())
    assert record["base_iteration"] == "release"
    (moved / "lora.json").write_text(json.dumps({**record, "base_iteration": "7"}))
    assert main(["export", str(moved), "--out", str(tmp_path / "d")]) == 1
    assert "is at iteration release, the adapter was trained on its iteration 7" in _one_line(capsys)


def _saved_peft(env: dict[str, Any], tmp_path: Path, model: str, targets: list[str], **kw: Any) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"peft-{model}-{len(targets)}"
    get_peft_model(AutoModelForCausalLM.from_pretrained(env["hf"][model]),
                   LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw)).save_pretrained(out)
    return out


def test_push_adapter_with_its_card(env: dict[str, Any], hub, capsys: pytest.CaptureFixture) -> None:
    from huggingface_hub import snapshot_download

    from tests.hub_fixture import TOKEN, USER

    single = run(env, "llama31", "single")
    assert main(["push", str(single["save"]), f"{USER}/tiny-lora", "--adapter", "--token", TOKEN]) == 0
    local = Path(snapshot_download(f"{USER}/tiny-lora", token=TOKEN))
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "loss_curve.png"]
    pushed, exported = load_file(local / "adapter_model.safetensors"), _adapter(env, "llama31-single")
    assert pushed.keys() == exported.keys() and all(torch.equal(pushed[k], exported[k]) for k in pushed)
    card = (local / "README.md").read_text()
    assert "library_name: peft" in card and "- lora" in card and "A LoRA adapter (HF PEFT format) for" in card
    assert "| Rank (r) | 4 |" in card and "| Alpha | 8 |" in card and "`q_proj`" in card and "`linear_qkv`" in card
    assert "![training loss](loss_curve.png)" in card and "PeftModel.from_pretrained(base" in card
    assert "| Base model | a local folder `hf-llama31" in card and str(env["hf"]["llama31"]) not in card


def test_model_flops_leave_out_the_frozen_base_weight_gradients(env: dict[str, Any]) -> None:
    """TFLOP/s and MFU of a LoRA run count 4 FLOPs per base weight (forward, input gradient), not 6."""
    from bridge.api import load_hf_config
    from bridge.training.metrics import flops_per_token

    record = run(env, "llama31", "single")["summary"]["records"][-1]
    flops = record["tflops_per_gpu"] * 1e12 * record["step_s"]
    cfg = load_hf_config(env["hf"]["llama31"])
    assert flops == pytest.approx(flops_per_token(cfg, 32, frozen_base=True) * 4 * 32, rel=1e-9)
