"""bridge train's pure parts: LR schedule, packing, splits, recipes, FLOPs, event files, and the checks that run
before any process starts (bad configs fail in the parent with one line)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bridge.cli.main import main
from bridge.data.indexed import IndexedDatasetWriter
from bridge.errors import BridgeError
from bridge.training.config import TrainConfig, load_recipe
from bridge.training.data import Documents, PackedDataset, split_documents
from bridge.training.lr import LRSchedule
from bridge.training.metrics import EventWriter, crc32c, flops_per_token, matmul_params, read_events
from bridge.training.plan import make_plan
from tests.model_fixtures import CONFIGS



def test_lr_schedule_warmup_cosine_linear_constant() -> None:
    cos = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, style="cosine")
    assert cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    lin = LRSchedule(lr=1.0, min_lr=0.0, warmup_iters=0, decay_iters=100, style="linear")
    assert lin(25) == pytest.approx(0.75)
    assert LRSchedule(lr=2.0, min_lr=0.0, warmup_iters=2, decay_iters=9, style="constant")(7) == 2.0


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 100, int(n)).astype(np.uint16) for n in rng.integers(1, 30, 40)]
    with IndexedDatasetWriter(tmp_path / "c", np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return str(tmp_path / "c"), docs


def test_packing_puts_eod_between_documents_and_covers_every_token(corpus: tuple[str, list[np.ndarray]]) -> None:
    prefix, docs = corpus
    ds = PackedDataset(Documents([prefix]), np.arange(len(docs)), seq_length=16, seed=3, eod=2)
    per_epoch = ds.tokens_per_epoch
    assert per_epoch == sum(d.size + 1 for d in docs)
    samples = [ds.sample(k)[0] for k in range(per_epoch // 16)]
    assert all(s.size == 17 for s in samples)
    stream = np.concatenate([s[:-1] for s in samples])
    assert (stream == 2).sum() >= len(docs) - 2  # one EOD per document (the tail window may cut the last)
    again = PackedDataset(Documents([prefix]), np.arange(len(docs)), seq_length=16, seed=3, eod=2)
    assert all(np.array_equal(again.sample(k)[0], samples[k]) for k in range(len(samples)))
    other = PackedDataset(Documents([prefix]), np.arange(len(docs)), seq_length=16, seed=4, eod=2)
    assert not all(np.array_equal(other.sample(k)[0], samples[k]) for k in range(len(samples)))


def test_packed_stream_is_the_permuted_documents_with_eod(corpus: tuple[str, list[np.ndarray]]) -> None:
    prefix, docs = corpus
    ds = PackedDataset(Documents([prefix]), np.arange(len(docs)), seq_length=8, seed=0, eod=2)
    n = ds.tokens_per_epoch // 8
    windows = np.concatenate([ds._stream(k * 8, 8)[0] for k in range(n)])  # unshuffled windows, epoch 0
    order = ds._epoch(0).order
    assert sorted(order.tolist()) == list(range(len(docs)))  # a permutation of the split's documents
    expected = np.concatenate([np.append(docs[d], 2) for d in order])[: n * 8]
    assert np.array_equal(windows, expected)  # the stream is the documents in that order, EOD after each


def test_split_documents() -> None:
    train, valid, test = split_documents(100, "969,30,1")
    assert (train.size, valid.size, test.size) == (97, 3, 0)
    assert split_documents(10, "8,2")[1].tolist() == [8, 9]


def test_recipe_keys_as_flags_and_unknown_key(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("micro-batch-size: 4\n--global-batch-size: 64\ndata: a b\nrecompute-granularity: full\n")
    assert load_recipe(recipe) == {"micro_batch_size": 4, "global_batch_size": 64, "data_path": ["a", "b"],
                                   "recompute": "full"}
    recipe.write_text("micro-batch: 4\n")
    with pytest.raises(BridgeError, match="unknown keys"):
        load_recipe(recipe)


def test_flops_formula_llama_3_2_1b() -> None:
    from bridge.api import load_hf_config

    cfg = load_hf_config(CONFIGS / "meta-llama--Llama-3.2-1B")
    # per layer: qkv 2048x3072, proj 2048x2048, fc1 2048x16384, fc2 8192x2048; output 2048x128256
    per_layer = 2048 * 3072 + 2048 * 2048 + 2048 * 16384 + 8192 * 2048
    assert matmul_params(cfg) == 16 * per_layer + 2048 * 128256
    assert flops_per_token(cfg, 2048) == 6 * matmul_params(cfg) + 12 * 16 * 2048 * 2048
    # LoRA: the frozen base's weight-gradient GEMMs (2 of the 6 FLOPs per weight) never run
    assert flops_per_token(cfg, 2048, frozen_base=True) == 4 * matmul_params(cfg) + 12 * 16 * 2048 * 2048


def test_flops_of_windowed_layers_count_the_window() -> None:
    """Gemma-2-2B: 13 of its 26 layers attend within 4096 tokens; at 8192 they count 4096 keys per query, not 8192."""
    from bridge.api import load_hf_config

    cfg = load_hf_config(CONFIGS / "google--gemma-2-2b")
    heads_dim = cfg.num_attention_heads * cfg.kv_channels
    assert sum(cfg.window(i) == 4096 for i in range(26)) == 13
    assert flops_per_token(cfg, 8192) == 6 * matmul_params(cfg) + 12 * heads_dim * (13 * 8192 + 13 * 4096)
    assert flops_per_token(cfg, 2048) == 6 * matmul_params(cfg) + 12 * heads_dim * 26 * 2048  # windows wider


def test_event_file_round_trip(tmp_path: Path) -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    writer = EventWriter(tmp_path)
    writer.scalars({"loss": 2.5, "lr": 0.001}, 7)
    writer.close()
    events = read_events(writer.path)
    assert [(s, t) for s, t, _ in events] == [(7, "loss"), (7, "lr")]
    assert events[0][2] == 2.5 and events[1][2] == pytest.approx(0.001)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bridge.api import import_hf

    return import_hf(tiny_hf("llama32-tied"), tmp_path_factory.mktemp("plan") / "ckpt")


@pytest.mark.parametrize("flags, message", [
    (["--nproc", "3", "--tp", "2"], "world size 3 is not divisible by tp*pp = 2*1"),
    (["--nproc", "2", "--global-batch-size", "6", "--micro-batch-size", "2"],
     "--global-batch-size 6 is not a multiple of micro-batch-size x DP = 2 x 2 = 4"),
    (["--seq-length", "4096"], "--seq-length 4096 is above the model's limit of 256"),
    (["--tp", "3", "--nproc", "3"], "is not divisible by --tp = 3"),
    (["--pp", "2", "--vpp", "2", "--nproc", "2", "--global-batch-size", "3", "--micro-batch-size", "1"],
     "multiple of --pp 2"),
    (["--profile", "--profile-step-start", "5", "--profile-step-end", "5"],
     "--profile-step-start 5 must be >= 1 and below --profile-step-end 5"),
    (["--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 needs --bf16"),
    (["--bf16", "--grad-reduce-in-bf16", "--accumulate-allreduce-grads-in-fp32"], "contradict each other"),
])
def test_bad_configs_fail_before_any_process(tiny_ckpt: Path, tmp_path: Path, flags: list[str], message: str,
                                             capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "d"
    with IndexedDatasetWriter(data, np.uint16) as w:
        w.add_document(np.arange(10))
    code = main(["train", "--load", str(tiny_ckpt), "--data", str(data), "--seq-length", "32", *flags])
    err = capsys.readouterr().err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_missing_data_files(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--load", str(tiny_ckpt), "--data", str(tmp_path / "nope"), "--seq-length", "32"])
    assert code == 1 and "nope.bin" in capsys.readouterr().err
    with pytest.raises(BridgeError, match="data file .*missing.jsonl does not exist"):
        make_plan(TrainConfig(load=str(tiny_ckpt), data_path=[str(tmp_path / "missing.jsonl")], seq_length=32))


def test_cli_surface() -> None:
    """Megatron-LM flag names bridge keeps (a renamed flag breaks recipes)."""
    from bridge.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    flags = {s for a in sub._actions for s in a.option_strings}
    for flag in ("--micro-batch-size", "--global-batch-size", "--seq-length", "--lr", "--min-lr", "--lr-decay-style",
                 "--lr-warmup-iters", "--train-iters", "--weight-decay", "--clip-grad", "--adam-beta1", "--adam-beta2",
                 "--adam-eps", "--bf16", "--sequence-parallel", "--use-distributed-optimizer", "--recompute",
                 "--recompute-granularity", "--save", "--load", "--save-interval", "--eval-interval", "--eval-iters",
                 "--seed", "--tensorboard-dir", "--data-path", "--data", "--split", "--config", "--nproc", "--tp", "--pp",
                 "--attention-backend", "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--profile",
                 "--profile-step-start", "--profile-step-end", "--profile-ranks", "--grad-reduce-in-bf16",
                 "--accumulate-allreduce-grads-in-fp32", "--fp8-format", "--fp8-recipe", "--fp8-output-proj", "--cp-comm-type",
                 "--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "--num-layers-at-end-in-bf16"):
        assert flag in flags, flag
    assert json.dumps(TrainConfig().clip_grad) == "1.0"


@pytest.mark.parametrize("flags, fp8, fp8_format, cp_comm_type", [
    (["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"], "tensorwise", "hybrid", "p2p"),
    (["--fp8-format", "e4m3", "--fp8-recipe", "tensorwise"], "tensorwise", "e4m3", "p2p"),
    (["--fp8", "tensorwise", "--fp8-format", "e4m3"], "tensorwise", "e4m3", "p2p"),
    (["--fp8", "rowwise", "--fp8-format", "e4m3"], "rowwise", "e4m3", "p2p"),
    (["--fp8-recipe", "delayed"], None, None, "p2p"),  # a recipe without a format leaves FP8 off, as in Megatron-LM
    (["--fp8", "rowwise", "--cp-comm-type", "all_gather"], "rowwise", None, "all_gather"),
    (["--cp-comm-type", "allgather", "allgather"], None, None, "all_gather"),  # Megatron's per-layer form
    (["--cp-comm-type", "a2a"], None, None, "a2a"),
    (["--cp-comm-type", "p2p", "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"], "tensorwise", "hybrid", "p2p"),
])
def test_megatron_fp8_and_cp_flags_map_to_bridges(flags: list[str], fp8: str | None, fp8_format: str | None,
                                                  cp_comm_type: str) -> None:
    from bridge.cli.main import build_parser
    from bridge.cli.train import config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", *flags]))
    assert (cfg.fp8, cfg.fp8_format, cfg.cp_comm_type) == (fp8, fp8_format, cp_comm_type)
    assert not cfg.fp8_output_proj
    with_head = config_from_args(build_parser().parse_args(["train", *flags, "--fp8-output-proj"]))
    assert with_head.fp8_output_proj and with_head.fp8 == fp8
    assert (cfg.first_last_layers_bf16, cfg.num_layers_at_start_in_bf16, cfg.num_layers_at_end_in_bf16) == (False, 1, 1)
    ends = config_from_args(build_parser().parse_args(["train", *flags, "--first-last-layers-bf16",
                                                       "--num-layers-at-end-in-bf16", "2"]))
    assert (ends.first_last_layers_bf16, ends.num_layers_at_start_in_bf16, ends.num_layers_at_end_in_bf16) == (True, 1, 2)


@pytest.mark.parametrize("flags, message", [
    (["--fp8-format", "hybrid"], "--fp8-recipe delayed (the default) is not available"),
    (["--fp8-format", "hybrid", "--fp8-recipe", "mxfp8"], "--fp8-recipe mxfp8 is not available"),
    (["--fp8-format", "e4m3"], "--fp8-recipe delayed (the default) is not available"),
    (["--fp8", "rowwise", "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"], "name different recipes"),
    (["--fp8", "rowwise", "--fp8-format", "hybrid"], "--fp8 rowwise keeps gradients in e4m3"),
    (["--cp-comm-type", "all_gather", "p2p"], "--cp-comm-type mixes all_gather and p2p over layers"),
    (["--cp-comm-type", "a2a+p2p"], "--cp-comm-type a2a+p2p is not available"),
])
def test_megatron_flags_bridge_does_not_run_are_refused(tiny_ckpt: Path, flags: list[str], message: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--load", str(tiny_ckpt), "--mock-data", "--seq-length", "32", *flags])
    err = capsys.readouterr().err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_defaults_are_megatron_lms() -> None:
    """A Megatron-LM launch line that leaves these out trains the same way here (megatron/training/config)."""
    cfg = TrainConfig()
    megatron = dict(lr_decay_style="linear", eval_iters=100, min_lr=0.0, lr_warmup_iters=0, weight_decay=0.01,
                    clip_grad=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, seed=1234, split="969,30,1",
                    bf16=False, grad_reduce_in_bf16=False, global_batch_size=None)
    assert {k: getattr(cfg, k) for k in megatron} == megatron


def test_global_batch_defaults_to_one_micro_batch_per_data_parallel_rank(tiny_ckpt: Path) -> None:
    """No --global-batch-size: micro-batch-size x DP samples per step, no accumulation (Megatron-LM's rule)."""
    from bridge.training import train

    cfg = TrainConfig(load=str(tiny_ckpt), mock_data=True, nproc=2, micro_batch_size=3, seq_length=32, train_iters=2,
                      eval_interval=0, progress=False, device="cpu")
    assert make_plan(cfg).num_microbatches == 1
    assert train(cfg)["tokens"] == 2 * (3 * 2) * 32  # steps x (micro x DP) samples x tokens


def test_profile_writes_a_trace_and_a_kernel_table(tiny_ckpt: Path, tmp_path: Path) -> None:
    from bridge.training import train

    out = tmp_path / "tb"
    train(TrainConfig(load=str(tiny_ckpt), mock_data=True, seq_length=32, global_batch_size=2, train_iters=3,
                      eval_interval=0, progress=False, device="cpu", profile=True, profile_step_start=2,
                      profile_step_end=3, tensorboard_dir=str(out)))
    table = (out / "profile_rank0.txt").read_text()
    assert "aten::mm" in table and "Self CPU" in table
    assert json.loads((out / "profile_rank0.json").read_text())["traceEvents"]


def test_sft_loss_mask_is_used_only_with_sft(tmp_path: Path) -> None:
    """The mask written by `bridge data prepare --chat` shapes the loss only when --sft asks for it."""
    docs = [np.array([5, 6, 7, 8], np.uint16), np.array([9, 10, 11], np.uint16)]
    masks = [np.array([0, 0, 1, 1], np.uint8), np.array([0, 1, 1], np.uint8)]
    prefix = tmp_path / "sft_text_document"
    from bridge.data.indexed import loss_mask_prefix

    for target, rows in ((prefix, docs), (Path(loss_mask_prefix(prefix)), masks)):
        with IndexedDatasetWriter(target, rows[0].dtype) as w:
            for row in rows:
                w.add_document(row)
    order = np.arange(2)
    sft = PackedDataset(Documents([str(prefix)], use_loss_mask=True), order, seq_length=8, seed=0, eod=2)
    plain = PackedDataset(Documents([str(prefix)]), order, seq_length=8, seed=0, eod=2)
    tokens, mask = sft._stream(0, 9)
    assert tokens.tolist() == [5, 6, 7, 8, 2, 9, 10, 11, 2]
    assert mask.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0]  # EOD after a masked document is not trained on
    assert plain._stream(0, 9)[1].tolist() == [1] * 9


def test_sft_without_a_mask_is_refused(tiny_ckpt: Path, corpus: tuple[str, list[np.ndarray]], tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--load", str(tiny_ckpt), "--data", corpus[0], "--sft", "--micro-batch-size", "1",
                 "--global-batch-size", "1", "--seq-length", "16", "--train-iters", "1", "--save", str(tmp_path / "r")])
    assert code == 1 and "--sft needs a loss mask" in capsys.readouterr().err


def test_host_runs_one_step_ahead_except_where_the_loop_acts(tiny_ckpt: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Step n+1 is queued before step n's results are read, but never past a save, an evaluation or the
    last step, where the loop needs the finished state; the checkpoints then hold what they should."""
    from bridge.training import train
    from bridge.training import loop

    order: list[str] = []
    launch, complete = loop.Trainer.launch, loop.Trainer.complete

    def spy_launch(self):  # noqa: ANN001, ANN202
        queued = launch(self)
        order.append(f"L{queued.iteration}")
        return queued

    def spy_complete(self, queued):  # noqa: ANN001, ANN202
        order.append(f"C{queued.iteration}")
        return complete(self, queued)

    monkeypatch.setattr(loop.Trainer, "launch", spy_launch)
    monkeypatch.setattr(loop.Trainer, "complete", spy_complete)
    summary = train(TrainConfig(load=str(tiny_ckpt), mock_data=True, seq_length=32, global_batch_size=2, train_iters=7,
                                save=str(tmp_path / "run"), save_interval=3, eval_interval=0, progress=False,
                                device="cpu"))
    assert order == ["L1", "L2", "C1", "L3", "C2", "C3",  # save after 3
                     "L4", "L5", "C4", "L6", "C5", "C6",  # save after 6
                     "L7", "C7"]                          # the last step
    assert [r["iteration"] for r in summary["records"]] == list(range(1, 8))
    saved = sorted(p.name for p in (tmp_path / "run").glob("iter_*"))
    assert saved == ["iter_0000003", "iter_0000006", "iter_0000007"]


@pytest.mark.parametrize("device, given, expected", [
    ("cuda", {}, "expandable_segments:True"),
    ("cuda", {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}, "max_split_size_mb:512"),
    ("cuda", {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, None),  # the newer name counts as the user's
    ("cpu", {}, None),
])
def test_cuda_allocator_default_leaves_the_users_choice(monkeypatch: pytest.MonkeyPatch, device: str, given: dict,
                                                        expected: str | None) -> None:
    from bridge.training.run import default_cuda_allocator

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    default_cuda_allocator(device)
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == expected


def test_peak_memory_keeps_the_runs_peak_and_each_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA each reading is the peak since the last one (the allocator's statistic, then reset) and the run's
    peak is the largest of them: a compilation's transient in the first steps does not hide a later step's."""
    from bridge.training.metrics import PeakMemory

    allocator = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: allocator["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: allocator.update(peak=0))
    memory, readings = PeakMemory(), []
    for peak in (50, 30, 40):  # GiB: compilation, then steps
        allocator["peak"] = peak * 2**30
        readings.append(memory.read())
    assert readings == [(50, 50), (50, 30), (50, 40)]
