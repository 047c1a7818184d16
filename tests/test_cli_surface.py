"""The CLI surface is frozen: sub-commands and Megatron-LM flag names users' scripts depend on."""
from __future__ import annotations

import argparse

from bridge.cli.main import build_parser

COMMANDS = {"import", "export", "reshard", "inspect", "verify", "train", "push", "data", "demo"}
FLAGS = {
    "import": {"--tp", "--tensor-model-parallel-size", "--pp", "--pipeline-model-parallel-size", "--vpp",
               "--virtual-pipeline-model-parallel-size", "--make-vocab-size-divisible-by", "--transformer-impl",
               "--dtype", "--out", "--revision", "--token", "--overwrite", "--format", "--ckpt-format",
               "--ep", "--expert-model-parallel-size", "--etp", "--moe-grouped-gemm", "--adapter", "--base"},
    "export": {"--out", "--max-shard-size", "--iteration", "--dtype", "--overwrite", "--hf-config", "--adapter"},
    "reshard": {"--out", "--tp", "--pp", "--vpp", "--transformer-impl", "--format", "--hf-config"},
    "verify": {"--prompts", "--dtype", "--device", "--sequence-parallel", "--cp", "--context-parallel-size"},
    "train": {"--load", "--save", "--data", "--data-path", "--nproc", "--tp", "--tensor-model-parallel-size",
              "--pp", "--pipeline-model-parallel-size", "--cp", "--context-parallel-size", "--sequence-parallel", "--use-distributed-optimizer",
              "--micro-batch-size", "--global-batch-size", "--seq-length", "--train-iters", "--lr", "--min-lr",
              "--lr-decay-style", "--lr-warmup-iters", "--weight-decay", "--clip-grad", "--adam-beta1",
              "--adam-beta2", "--bf16", "--recompute", "--save-interval", "--eval-interval", "--eval-iters",
              "--seed", "--tensorboard-dir", "--split", "--config", "--lora-rank", "--lora-alpha", "--lora-dropout",
              "--lora-target-modules", "--lora-use-dora"},
    "push": {"--revision", "--private", "--token", "--commit-message", "--adapter"},
}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_commands_and_flags() -> None:
    commands = subparsers(build_parser())
    assert COMMANDS <= set(commands)
    for command, flags in FLAGS.items():
        options = {s for a in commands[command]._actions for s in a.option_strings}
        assert flags <= options, (command, sorted(flags - options))


def test_megatron_defaults() -> None:
    from bridge.training.config import TrainConfig

    commands = subparsers(build_parser())
    defaults = TrainConfig()  # `bridge train` leaves unset flags to TrainConfig (a --config file may set them)
    assert defaults.bf16 is False  # fp32 unless --bf16, as in Megatron-LM
    assert defaults.clip_grad == 1.0 and defaults.seed == 1234  # Megatron-LM's --clip-grad and --seed defaults
    imp = commands["import"].parse_args(["some/model"])
    assert (imp.tp, imp.pp, imp.make_vocab_size_divisible_by) == (1, 1, 128)


def test_version_names_bridge_and_the_libraries_that_decide_behaviour(capsys) -> None:
    from importlib.metadata import version

    import pytest

    import bridge

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"bridge {bridge.__version__} (")
    assert f"torch {version('torch')}" in line and f"transformers {version('transformers')}" in line
