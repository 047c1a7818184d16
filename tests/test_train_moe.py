"""CPU/gloo acceptance for MoE training: 10 fp32 steps at EP=2, EP=2 x TP=2 (and with the distributed optimizer or
sequence parallelism), CP=2, and EP=2 spread over CP=2 give the single-process losses (1e-5 relative) for tiny
Mixtral, Qwen3-MoE, Qwen2-MoE, DeepSeek-V3, GLM-4.5 (whose MTP layer is carried unchanged) and GPT-OSS;
checkpoints are saved per EP rank in Megatron's names and `bridge export` of them gives the single-process weights;
the aux loss is trained and reported; DeepSeek's expert bias moves after every step; bad EP settings fail before any
spawn."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from bridge.api import export_hf, import_hf
from bridge.cli.main import main
from bridge.errors import BridgeError
from bridge.training import TrainConfig, train
from bridge.training.plan import make_plan
from tests.model_fixtures import load_pt, write_random_corpus

pytestmark = pytest.mark.slow

#: (architecture, layout name) -> TrainConfig overrides; every run is compared with its architecture's single run.
RUNS = {
    ("mixtral", "ep2"): dict(nproc=2, ep=2),
    ("mixtral", "ep2-tp2"): dict(nproc=4, ep=2, tp=2),
    ("qwen3-moe", "ep2-tp2-distopt"): dict(nproc=4, ep=2, tp=2, use_distributed_optimizer=True),
    ("deepseek-v3", "ep2"): dict(nproc=2, ep=2),
    ("mixtral", "cp2"): dict(nproc=2, cp=2),  # the aux loss's expert counts are summed over the CP group
    ("qwen3-moe", "cp2-ep2"): dict(nproc=2, cp=2, ep=2),  # the two CP ranks of a sequence split the experts
    ("mixtral", "cp2-ep2-dp2"): dict(nproc=4, cp=2, ep=2, use_distributed_optimizer=True),  # expert-DP = dp x cp / ep
    ("deepseek-v3", "cp2-ep2"): dict(nproc=2, cp=2, ep=2),  # MLA through the ring; expert-bias loads over DP x CP
    # sequence parallelism: each TP rank routes its shard; aux-loss shares and router gradients summed over TP
    ("mixtral", "ep2-tp2-sp"): dict(nproc=4, ep=2, tp=2, sequence_parallel=True),
    ("qwen2-moe", "tp2-sp"): dict(nproc=2, tp=2, sequence_parallel=True),  # the gated shared expert on the shards
    ("deepseek-v3", "tp2-cp2-sp"): dict(nproc=4, tp=2, cp=2, sequence_parallel=True),  # MLA's down-projections too
    # GLM-4.5: partial rotary, qkv bias, DeepSeek's router; its MTP layer is carried, not trained
    ("glm4.5-air", "ep2"): dict(nproc=2, ep=2),
    ("glm4.5-air", "ep2-tp2"): dict(nproc=4, ep=2, tp=2),
    ("glm4.5-air", "cp2-ep2"): dict(nproc=2, cp=2, ep=2),  # partial rotary on each CP rank's two chunks
    # sinks, router and expert biases (fc2's added on one TP rank, its gradient on all), the clamped SwiGLU
    ("gpt-oss", "ep2"): dict(nproc=2, ep=2),
    ("gpt-oss", "ep2-tp2"): dict(nproc=4, ep=2, tp=2),
    # the attention blocks of MoE layers recomputed but for their matmuls and attention (sinks through FlexAttention)
    ("gpt-oss", "ep2-recompute-elementwise"): dict(nproc=2, ep=2, recompute="elementwise"),
}


#: Weights whose gradient is zero in exact arithmetic, where Adam turns rounding noise into steps of up to the learning
#: rate: the key bias's channels that RoPE leaves alone add the same to every score of a query (GLM-4.5's partial
#: rotary). Runs differ there by the noise's steps (up to 8e-6 here), not by 1e-5; they are held to 1e-4.
NOISE_ONLY = {"glm4.5-air": ("self_attn.k_proj.bias",)}


def rank_dirs(tp: int = 1, ep: int = 1) -> list[str]:
    """Megatron's rank folders: mp_rank_{tp:02d}, with _{ep:03d} when EP > 1."""
    return [f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep > 1 else "") for t in range(tp) for e in range(ep)]


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-moe")
    paths = {"root": root, "data": root / "corpus"}
    for arch in sorted({a for a, _ in RUNS}):
        paths[arch] = import_hf(tiny_hf(arch), root / f"ckpt-{arch}")  # EP=1: the trainer reshards to its EP
    write_random_corpus(paths["data"], seed=0, documents=80)
    return paths


def config(setup: dict[str, Path], arch: str, name: str, **kw: object) -> TrainConfig:
    base = dict(load=str(setup[arch]), data_path=[str(setup["data"])], micro_batch_size=2, global_batch_size=8,
                seq_length=32, train_iters=10, lr=1e-3, lr_warmup_iters=2, eval_interval=5, eval_iters=1,
                progress=False, save=str(setup["root"] / "runs" / f"{arch}-{name}"), device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def references(setup: dict[str, Path]) -> dict[str, dict]:
    out = {}
    for arch in sorted({a for a, _ in RUNS}):
        out[arch] = train(config(setup, arch, "single", nproc=1))
        export_hf(setup["root"] / "runs" / f"{arch}-single", setup["root"] / f"hf-{arch}-single")
    return out


@pytest.fixture(scope="module")
def layout_run(setup: dict[str, Path]) -> Callable[[str, str], dict]:
    """Train a RUNS layout once per module: its summary, its checkpoint under runs/{arch}-{name}. The layout tests
    and the expert-bias test share the runs, and either trains what it needs when run alone."""
    done: dict[tuple[str, str], dict] = {}

    def run(arch: str, name: str) -> dict:
        if (arch, name) not in done:
            done[arch, name] = train(config(setup, arch, name, **RUNS[arch, name]))
        return done[arch, name]

    return run


def _rank_file(run: Path, rank_dir: str) -> dict:
    return load_pt(run / "iter_0000010" / rank_dir / "model_optim_rng.pt")


@pytest.mark.parametrize("arch, name", list(RUNS))
def test_ep_layout_matches_single_process(setup: dict[str, Path], references: dict, layout_run: Callable, arch: str,
                                          name: str) -> None:
    reference = references[arch]
    summary = layout_run(arch, name)
    ref, got = ([loss for _, loss in s["loss_curve"]] for s in (reference, summary))
    assert len(got) == 10
    rel = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    print(f"{arch} {name}: max relative loss difference over 10 steps {rel:.2e}")
    assert rel <= 1e-5, (arch, name, got, ref)
    assert summary["final_valid_loss"] == pytest.approx(reference["final_valid_loss"], rel=1e-5)
    aux, ref_aux = ([r["moe_aux_loss"] for r in s["records"]] for s in (summary, reference))
    assert aux == pytest.approx(ref_aux, rel=1e-5, abs=1e-9)
    run = setup["root"] / "runs" / f"{arch}-{name}"
    expected = rank_dirs(RUNS[arch, name].get("tp", 1), RUNS[arch, name].get("ep", 1))
    assert sorted(p.name for p in (run / "iter_0000010").iterdir()) == expected
    state = _rank_file(run, expected[-1])
    assert state["args"].expert_model_parallel_size == RUNS[arch, name].get("ep", 1) and state["iteration"] == 10
    optimizer = state["optimizer"]  # the distributed optimizer's state sits in distrib_optim.pt beside the model file
    params = optimizer["params"] if "params" in optimizer else \
        load_pt(run / "iter_0000010" / expected[-1] / optimizer["params_file"])["params"]
    assert set(params) == {f"model.{k}" for k, v in state["model"].items() if "_extra_state" not in k
                           and not k.endswith("expert_bias") and not k.startswith("mtp.")}
    out = export_hf(run, setup["root"] / f"hf-{arch}-{name}")
    ours, theirs = load_file(out / "model.safetensors"), load_file(setup["root"] / f"hf-{arch}-single" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    noise = [k for k in theirs if k.endswith(NOISE_ONLY.get(arch, ()))]
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs if k not in noise)
    print(f"{arch} {name}: max |weight difference| after export {worst:.2e}")
    assert worst <= 1e-5
    assert all((ours[k] - theirs[k]).abs().max().item() <= 1e-4 for k in noise)


def test_glm_mtp_layer_is_carried_unchanged(setup: dict[str, Path], tiny_hf, references: dict,
                                            layout_run: Callable) -> None:
    """GLM-4.5's MTP layer is not trained: after 10 steps at every layout the exported MTP tensors are the source's,
    byte for byte, except its embed_tokens and shared_head.head, which Megatron's MTP shares with the model: they are
    the trained embedding and head."""
    source = load_file(tiny_hf("glm4.5-air") / "model.safetensors")
    mtp = "model.layers.4."
    for name in ("single", "ep2", "ep2-tp2"):
        if name != "single":
            layout_run("glm4.5-air", name)
        out = load_file(setup["root"] / f"hf-glm4.5-air-{name}" / "model.safetensors") if name == "single" else \
            load_file(export_hf(setup["root"] / "runs" / f"glm4.5-air-{name}", setup["root"] / f"hf-glm-mtp-{name}")
                      / "model.safetensors")
        assert out.keys() == source.keys()
        shared = {mtp + "embed_tokens.weight": "model.embed_tokens.weight", mtp + "shared_head.head.weight": "lm_head.weight"}
        for key in (k for k in source if k.startswith(mtp)):
            expected = out[shared[key]] if key in shared else source[key]
            assert torch.equal(out[key], expected), (name, key)
        assert not torch.equal(out["model.layers.3.mlp.experts.0.down_proj.weight"],
                               source["model.layers.3.mlp.experts.0.down_proj.weight"])  # the decoder did train


def test_compiled_mla_and_moe_layers_match_eager(setup: dict[str, Path], references: dict) -> None:
    """--compile (Inductor on the CPU) of DeepSeek-V3's layers: MLA's narrower v is padded for the CPU's fused SDPA
    kernel (unpadded, SDPA's math path tripped Inductor's attention pattern matcher), and the losses are the eager
    run's."""
    summary = train(config(setup, "deepseek-v3", "compiled", nproc=1, compile=True, exit_interval=4, eval_interval=0,
                           save=None))
    got = [loss for _, loss in summary["loss_curve"]]
    ref = [loss for _, loss in references["deepseek-v3"]["loss_curve"]][:4]
    assert len(got) == 4
    assert max(abs(a - b) / b for a, b in zip(got, ref)) <= 1e-5, (got, ref)


def test_aux_loss_is_trained_and_reported(references: dict) -> None:
    """Mixtral (coefficient 0.02) and Qwen3-MoE (0.001) report their load-balancing loss; DeepSeek has none."""
    for arch in ("mixtral", "qwen3-moe"):
        aux = [r["moe_aux_loss"] for r in references[arch]["records"]]
        assert all(a > 0 for a in aux) and len(set(aux)) > 1, (arch, aux)
    assert all(r["moe_aux_loss"] == 0.0 for r in references["deepseek-v3"]["records"])


def test_deepseek_expert_bias_moves_and_is_saved(setup: dict[str, Path], references: dict, layout_run: Callable) -> None:
    """Auxiliary-loss-free balancing: after 10 steps every MoE router's bias is nonzero, the same in every EP file
    (also when EP spans the CP ranks, and under sequence parallelism, where each TP rank routes a shard)."""
    single = _rank_file(setup["root"] / "runs" / "deepseek-v3-single", "mp_rank_00")["model"]
    biases = {k: v for k, v in single.items() if k.endswith("router.expert_bias")}
    assert biases and all(v.abs().max() > 0 for v in biases.values())
    runs = {"ep2": rank_dirs(ep=2), "cp2-ep2": rank_dirs(ep=2),  # CP: loads summed over DP x CP
            "tp2-cp2-sp": rank_dirs(tp=2)}  # SP: the loads of the whole TP sequence
    for name, dirs in runs.items():
        layout_run("deepseek-v3", name)
        for rank_dir in dirs:
            model = _rank_file(setup["root"] / "runs" / f"deepseek-v3-{name}", rank_dir)["model"]
            for k, v in biases.items():
                torch.testing.assert_close(model[k], v, rtol=0, atol=0)


def test_bad_expert_parallel_configs_fail_before_spawn(setup: dict[str, Path], tiny_hf,
                                                       capsys: pytest.CaptureFixture) -> None:
    common = ["train", "--load", str(setup["mixtral"]), "--data", str(setup["data"]), "--seq-length", "32"]
    cases = [(["--nproc", "3", "--ep", "3"], "num_experts = 4 is not divisible by --ep = 3"),
             (["--nproc", "2", "--tp", "2", "--ep", "2"], "--ep 2 must divide the data-parallel size world/(tp*pp) = 1"),
             (["--nproc", "3", "--ep", "2"], "--ep 2 must divide the data-parallel size world/(tp*pp) = 3"),
             (["--nproc", "2", "--cp", "2", "--ep", "4"], "--ep 4 must divide dp x cp = world/(tp*pp) = 2")]
    for flags, message in cases:
        assert main([*common, *flags]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    dense = import_hf(tiny_hf("llama32-tied"), setup["root"] / "dense-ckpt")
    with pytest.raises(BridgeError, match="need a Mixture-of-Experts model"):
        make_plan(TrainConfig(load=str(dense), mock_data=True, seq_length=32, ep=2, nproc=2))


def test_mfu_counts_active_expert_parameters() -> None:
    """Mixtral-8x7B multiplies each token through ~12.9B weights (top-2 of 8 experts), 12.75B without the input
    embedding: MFU must not count all 46.7B, nor only one expert."""
    from bridge.api import load_hf_config
    from bridge.training.metrics import matmul_params
    from tests.model_fixtures import real_config

    assert matmul_params(load_hf_config(real_config("mixtral").parent)) == pytest.approx(12.75e9, rel=1e-3)
