"""Checkpoints of today's Megatron stack: Megatron Core 0.19 `torch_dist` folders and Megatron-Bridge run folders.

Fixtures are written at test time by Megatron Core's own `dist_checkpointing.save` (tests/interop/
megatron_current_worker.py) at TP=1 and TP=2, with the vocabulary unpadded (1000 rows, as Megatron-Bridge keeps
it) and padded (1024, 1008), and the common state inside the DCP files, no `common.pt` (Megatron Core 0.19's layout;
an older Megatron Core is given 0.19's `common_state` object and its `common.pt` is removed). Their weights come from
a tiny HF model through bridge's import and Megatron's load, whose logits are checked against transformers'.

- Megatron-LM folders carry `args` in the common state; Megatron-Bridge run folders carry none, only
  `checkpoint_version`, `iteration` and `content_metadata`, with `run_config.yaml` and `train_state.pt` in the
  iteration folder and `latest_train_state.pt` beside it. Megatron-Bridge 0.6.2 cannot be imported on a CPU machine
  (it imports Transformer Engine), so its `run_config.yaml` is written here in its schema, taken from its source:
  `ConfigContainer.to_yaml` (megatron/training/config/container.py: `_target_` per dataclass, torch dtypes and
  functions as `{_target_, _call_: false}`), the `model:` section a `GPTModelProvider` (TransformerConfig fields plus
  `vocab_size`, `should_pad_vocab`, `make_vocab_size_divisible_by`, `share_embeddings_and_output_weights`), written
  by `save_checkpoint` (megatron/bridge/training/checkpointing.py) into `iter_{N:07d}/`.
- `bridge export --hf-config` gives the HF weights back bit for bit from every folder; the layout comes from the
  `args` or, without them, from `run_config.yaml`.
- Megatron Core loads bridge's own `torch_dist` output; with 0.19, the default folder (common state inside the DCP
  files) loads with no warning at all; one written with `--common-pt`, for Megatron Core up to 0.18, loads with 0.19's
  deprecation warning (0.19 reads a `common.pt` first).
Skipped when megatron-core or triton is absent (install .ci/requirements-interop.txt).
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from bridge.api import import_hf
from bridge.apps.verify import DEFAULT_PROMPTS, compare, encode, hf_logits
from bridge.cli.main import main
from bridge.launch import launch
from tests.interop.common import MEGATRON_CORE_MARKS
from tests.test_convert_roundtrip import assert_identical

pytestmark = MEGATRON_CORE_MARKS
#: Untied Llama and tied Qwen3, both with the 1000-token vocabulary of the report.
MODELS = {"llama-untied": "llama31", "qwen3-tied": "qwen3-tied"}
VOCAB = 1000
ITERATION = 7
#: (TP, vocabulary rows, who wrote it): the unpadded and a padded vocabulary at both TP sizes.
FOLDERS = ((1, 1000, "megatron-bridge"), (1, 1024, "megatron-lm"), (2, 1000, "megatron-lm"), (2, 1008, "megatron-bridge"))


def megatron_lm_common(cfg: Any, tp: int, rows: int) -> dict[str, Any]:
    """Megatron-LM's common state: `args` (the fields its checkpoint loader and bridge read), version, iteration."""
    from megatron.core.transformer.enums import AttnBackend

    args = argparse.Namespace(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, group_query_attention=True, num_query_groups=cfg.num_key_value_heads,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        padded_vocab_size=rows, make_vocab_size_divisible_by=8, ckpt_format="torch_dist", transformer_impl="local",
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings, bf16=False, fp16=False,
        attention_backend=AttnBackend.auto, exit_signal=signal.SIGTERM)  # enums every Megatron-LM 0.19 namespace holds
    return {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION}


def megatron_bridge_common() -> dict[str, Any]:
    """Megatron-Bridge's common state: no `args` (its `content_metadata` as `_build_sharded_state_dict_metadata`)."""
    return {"checkpoint_version": 3.0, "iteration": ITERATION,
            "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}}


def megatron_bridge_run_config(cfg: Any, tp: int, rows: int, root: Path) -> dict[str, Any]:
    """`run_config.yaml` as Megatron-Bridge 0.6.2 writes it (schema from its source; see the module docstring)."""
    function = lambda target: {"_target_": target, "_call_": False}  # noqa: E731
    return {
        "_target_": "megatron.bridge.training.config.ConfigContainer",
        "model": {
            "_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider",
            "num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_attention_heads, "num_query_groups": cfg.num_key_value_heads,
            "kv_channels": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1,
            "virtual_pipeline_model_parallel_size": None, "context_parallel_size": 1,
            "vocab_size": VOCAB, "should_pad_vocab": rows != VOCAB, "make_vocab_size_divisible_by": 8,
            "share_embeddings_and_output_weights": cfg.tie_word_embeddings, "normalization": "RMSNorm",
            "gated_linear_unit": True, "add_bias_linear": False, "qk_layernorm": cfg.model_type == "qwen3",
            "position_embedding_type": "rope", "rotary_base": int(cfg.rope_parameters["rope_theta"])
            if getattr(cfg, "rope_parameters", None) else 10000, "seq_length": 256,
            "bf16": False, "fp16": False, "params_dtype": function("torch.float32"),
            "activation_func": function("torch.nn.functional.silu"),
            "transformer_layer_spec": function("megatron.bridge.models.gpt_provider.default_layer_spec"),
        },
        "checkpoint": {"_target_": "megatron.bridge.training.config.CheckpointConfig", "ckpt_format": "torch_dist",
                       "save": str(root), "load": None, "save_interval": ITERATION},
    }


def _run_folder(saved: Path, root: Path, writer: str, run_config: dict[str, Any]) -> Path:
    """What each tool leaves around Megatron Core's iteration folder: its tracker, and for Megatron-Bridge the run
    configuration and train state (in the iteration folder) and `latest_train_state.pt` (beside it)."""
    folder = root / f"iter_{ITERATION:07d}"
    root.mkdir(parents=True)
    shutil.copytree(saved, folder)
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    if writer == "megatron-bridge":
        (folder / "run_config.yaml").write_text(yaml.safe_dump(run_config, default_flow_style=False))
        train_state = {"step": torch.tensor(ITERATION), "consumed_train_samples": torch.tensor(0)}
        torch.save(train_state, folder / "train_state.pt")
        torch.save(train_state, root / "latest_train_state.pt")
    return root


@pytest.fixture(scope="module")
def written(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int, int], tuple[Path, Path]]:
    """(model, TP, rows) -> (HF source, Megatron run folder), after checking Megatron's logits."""
    from transformers import AutoConfig

    from tests.interop.megatron_current_worker import resave

    tmp = tmp_path_factory.mktemp("current-megatron")
    sources = {name: tiny_hf(real, vocab_size=VOCAB) for name, real in MODELS.items()}
    ckpts = {name: import_hf(hf, tmp / f"{name}-bridge", format="torch_dist") for name, hf in sources.items()}
    tokens = encode(next(iter(sources.values())), DEFAULT_PROMPTS, VOCAB)
    out: dict[tuple[str, int, int], tuple[Path, Path]] = {}
    for tp in (1, 2):
        plans, keys = [], []
        for name, hf in sources.items():
            cfg = AutoConfig.from_pretrained(hf)
            for _, rows, writer in (f for f in FOLDERS if f[0] == tp):
                common = megatron_lm_common(cfg, tp, rows) if writer == "megatron-lm" else megatron_bridge_common()
                plans.append({"ckpt": str(ckpts[name]), "rows": rows, "out": str(tmp / f"{name}-tp{tp}-{rows}-saved"),
                              "common": common, "writer": writer,
                              "run_config": megatron_bridge_run_config(cfg, tp, rows, tmp / f"{name}-tp{tp}-{rows}")})
                keys.append((name, tp, rows))
        logits = launch(resave, tp, [{k: p[k] for k in ("ckpt", "rows", "out", "common")} for p in plans], tokens)[0]
        for key, plan, ours in zip(keys, plans, logits):
            hf = sources[key[0]]
            _, overall, passed, criterion = compare(DEFAULT_PROMPTS, hf_logits(hf, tokens, "fp32", "cpu"), ours, "fp32")
            assert passed and overall.top1 == 1.0, f"{key}: Megatron Core's logits differ from transformers': {criterion}"
            out[key] = hf, _run_folder(Path(plan["out"]), tmp / f"{key[0]}-tp{key[1]}-{key[2]}", plan["writer"],
                                       plan["run_config"])
    return out


def test_folders_have_megatron_core_019_layout(written) -> None:
    """The fixtures are what Megatron Core 0.19 writes: common state inside the DCP files, no common.pt."""
    for _, root in written.values():
        folder = root / f"iter_{ITERATION:07d}"
        assert not (folder / "common.pt").exists()
        assert json.loads((folder / "metadata.json").read_text()) == {"sharded_backend": "torch_dist",
                                                                      "sharded_backend_version": 1}


@pytest.fixture
def no_megatron_safe_globals() -> Any:
    """Importing Megatron Core registers its classes (AttnBackend, ...) with torch.load process-wide; bridge must read
    Megatron's args without them, as it does in a process that never imports Megatron."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    yield
    torch.serialization.add_safe_globals(saved)


@pytest.mark.usefixtures("no_megatron_safe_globals")
@pytest.mark.parametrize("tp,rows,writer", FOLDERS)
def test_export_is_bit_exact(written, tmp_path: Path, tp: int, rows: int, writer: str, capsys) -> None:
    for name in MODELS:
        hf, root = written[name, tp, rows]
        out = tmp_path / f"{name}-hf"
        assert main(["export", str(root), "--out", str(out), "--hf-config", str(hf)]) == 0, capsys.readouterr().err
        assert_identical(hf, out)
        capsys.readouterr()
        assert main(["inspect", str(root), "--hf-config", str(hf), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["layout"]["tp"] == tp, f"{writer}: layout not read from its {'args' if writer == 'megatron-lm' else 'run_config.yaml'}"
        assert info["vocab"] == {"original": VOCAB, "padded": rows}
        assert info["iteration"] == ITERATION


def test_run_folder_without_args_or_run_config_is_one_line(written, tmp_path: Path, capsys) -> None:
    hf, root = written["llama-untied", 2, 1008]
    bare = tmp_path / "bare"
    shutil.copytree(root, bare)
    (bare / f"iter_{ITERATION:07d}" / "run_config.yaml").unlink()
    assert main(["export", str(bare), "--out", str(tmp_path / "hf"), "--hf-config", str(hf)]) == 1
    err = capsys.readouterr().err.strip()
    assert "no Megatron-LM `args`" in err and "run_config.yaml" in err and "\n" not in err and "Traceback" not in err


def test_vocabulary_smaller_than_the_hf_one_is_refused(written, tiny_hf, tmp_path: Path, capsys) -> None:
    _, root = written["llama-untied", 1, 1000]
    bigger = tiny_hf(MODELS["llama-untied"], vocab_size=1100)
    capsys.readouterr()
    assert main(["export", str(root), "--out", str(tmp_path / "hf"), "--hf-config", str(bigger)]) == 1
    err = capsys.readouterr().err.strip()
    assert "vocabulary: checkpoint 1000 rows vs HF 1100" in err and "\n" not in err


def test_megatron_core_loads_bridge_output_without_a_deprecation_warning(tiny_hf, tmp_path: Path) -> None:
    from tests.interop.megatron_current_worker import DCP_COMMON_STATE, core_version, load_messages

    hf = tiny_hf(MODELS["qwen3-tied"], vocab_size=VOCAB)
    both = tmp_path / "with-common-pt"
    assert main(["import", str(hf), "--out", str(both), "--format", "torch_dist", "--transformer-impl", "local",
                 "--common-pt"]) == 0
    current = import_hf(hf, tmp_path / "default", format="torch_dist", transformer_impl="local")
    assert not (current / "release" / "common.pt").exists() and (both / "release" / "common.pt").exists()
    new = core_version() >= DCP_COMMON_STATE
    found = launch(load_messages, 1, [str(both), str(current)] if new else [str(both)])[0]
    for state in found:
        assert state["checkpoint_version"] == 3.0 and state["iteration"] == 0
        assert state["args"]["ckpt_format"] == "torch_dist" and state["args"]["padded_vocab_size"] == 1024
    if new:
        assert found[1]["messages"] == [], found[1]["messages"]
        assert any("deprecated" in m for m in found[0]["messages"]), "Megatron Core 0.19 no longer prefers common.pt"


def test_verify_takes_a_megatron_bridge_run_with_hf_config(written, capsys) -> None:
    """`bridge verify` of a Megatron-Bridge folder at TP=2 (unpadded vocabulary): its ranks read the layout from
    run_config.yaml and the weights from Megatron Core's files; the logits are transformers'."""
    hf, root = written["qwen3-tied", 2, 1000]
    assert main(["verify", str(hf), str(root), "--no-json"]) == 1
    assert "pass --hf-config" in capsys.readouterr().err
    assert main(["verify", str(hf), str(root), "--hf-config", str(hf), "--no-json"]) == 0, capsys.readouterr()
    assert "layout tp=2 pp=1" in capsys.readouterr().out
