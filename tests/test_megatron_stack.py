"""What bridge writes for the rest of today's Megatron stack: `--out-iteration`, `--no-common-pt`, the completed
`args` and Megatron-Bridge's `run_config.yaml` (tests/interop checks Megatron Core loading these folders).

References are the HF config.json the checkpoint came from and the DCP metadata as torch's own FileSystemReader
reads it, not bridge's readers.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

from bridge.cli.main import main
from bridge.converters.foreign import args_from_run_config
from bridge.converters.megatron_stack import ARG_DEFAULTS
from bridge.errors import BridgeError
from tests.model_fixtures import load_pt
from tests.test_convert_roundtrip import assert_identical
from tests.test_foreign_checkpoint import strip_bridge_files


def _dcp_common_state(folder: Path) -> dict:
    """The common state Megatron Core 0.19 reads: the DCP byte entry `common_state/shard_0_1`, `[state]` saved."""
    blob = {"common_state/shard_0_1": io.BytesIO()}
    dcp.load(blob, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    loaded = blob["common_state/shard_0_1"]
    with torch.serialization.safe_globals([argparse.Namespace]):
        (state,) = torch.load(io.BytesIO(loaded.getvalue()), weights_only=True) if isinstance(loaded, io.BytesIO) else loaded
    return state


def test_default_folder_is_megatron_core_019s_layout(tiny_hf, tmp_path: Path, capsys) -> None:
    """No common.pt by default: the common state (args included) lives only inside the DCP files."""
    hf = tiny_hf("llama32-tied")
    ckpt = tmp_path / "dist"
    assert main(["import", str(hf), "--out", str(ckpt), "--format", "torch_dist", "--tp", "2", "--out-iteration", "3"]) == 0
    folder = ckpt / "iter_0000003"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "3" and not (ckpt / "release").exists()
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "metadata.json", "run_config.yaml"]
    assert json.loads((folder / "metadata.json").read_text()) == {"sharded_backend": "torch_dist",
                                                                  "sharded_backend_version": 1}
    state = _dcp_common_state(folder)
    assert state["iteration"] == 3 and state["checkpoint_version"] == 3.0 and state["args"].iteration == 3
    assert state["args"].ckpt_format == "torch_dist" and state["args"].tensor_model_parallel_size == 2
    assert set(ARG_DEFAULTS) <= set(vars(state["args"]))
    strip_bridge_files(ckpt)  # read back as a foreign folder: its args come from the DCP entry alone
    (folder / "run_config.yaml").unlink()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf"), "--hf-config", str(hf)]) == 0
    assert_identical(hf, tmp_path / "hf")


def test_run_config_describes_the_checkpoint(tiny_hf, tmp_path: Path) -> None:
    hf = tiny_hf("qwen3")
    ckpt = tmp_path / "dist"
    assert main(["import", str(hf), "--out", str(ckpt), "--format", "torch_dist", "--tp", "2", "--pp", "2",
                 "--dtype", "bf16"]) == 0
    folder = ckpt / "release"
    data = yaml.safe_load((folder / "run_config.yaml").read_text())
    assert data["_target_"] == "megatron.bridge.training.config.ConfigContainer"
    assert data["checkpoint"]["ckpt_format"] == "torch_dist"
    model, hf_cfg = data["model"], json.loads((hf / "config.json").read_text())
    rows = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata["embedding.word_embeddings.weight"].size[0]
    assert model["_target_"] == "megatron.bridge.models.gpt_provider.GPTModelProvider"
    assert (model["num_layers"], model["hidden_size"], model["ffn_hidden_size"], model["num_attention_heads"],
            model["num_query_groups"], model["kv_channels"]) == (
        hf_cfg["num_hidden_layers"], hf_cfg["hidden_size"], hf_cfg["intermediate_size"], hf_cfg["num_attention_heads"],
        hf_cfg["num_key_value_heads"], hf_cfg["head_dim"])
    assert (model["vocab_size"], model["should_pad_vocab"]) == (rows, False)  # the rows stored, padded for TP=2
    assert model["share_embeddings_and_output_weights"] == hf_cfg["tie_word_embeddings"] and model["qk_layernorm"]
    assert (model["tensor_model_parallel_size"], model["pipeline_model_parallel_size"]) == (2, 2)
    assert model["params_dtype"] == {"_target_": "torch.bfloat16", "_call_": False} and model["bf16"]
    args = args_from_run_config(folder / "run_config.yaml")  # what bridge reads from a Megatron-Bridge folder
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.bf16) == (2, 2, True)
    assert args.untie_embeddings_and_output_weights == (not hf_cfg["tie_word_embeddings"])


@pytest.mark.parametrize("name", ["smollm3", "phi3"])
def test_run_config_carries_the_rope_of_each_layer(name: str, tiny_hf, tmp_path: Path) -> None:
    """SmolLM3's NoPE layers (Megatron's no_rope_freq: 1 skips RoPE) and Phi-3's partial rotary, from the HF config."""
    hf = tiny_hf(name)
    assert main(["import", str(hf), "--out", str(tmp_path / "dist"), "--format", "torch_dist"]) == 0
    model = yaml.safe_load((tmp_path / "dist" / "release" / "run_config.yaml").read_text())["model"]
    hf_cfg = json.loads((hf / "config.json").read_text())
    assert model["rotary_percent"] == hf_cfg.get("partial_rotary_factor", 1.0)
    assert model.get("no_rope_freq") == ([1 - f for f in hf_cfg["no_rope_layers"]] if "no_rope_layers" in hf_cfg else None)


def test_run_config_carries_gemmas_norms_activation_and_scale(tiny_hf, tmp_path: Path) -> None:
    """Gemma 2's (1 + w) norms, tanh GELU and query_pre_attn_scalar, as Megatron-Bridge's Gemma providers name them
    (what the GPT provider cannot build, the softcaps and post-norms, docs/formats.md lists)."""
    hf = tiny_hf("gemma2")
    assert main(["import", str(hf), "--out", str(tmp_path / "dist"), "--format", "torch_dist"]) == 0
    model = yaml.safe_load((tmp_path / "dist" / "release" / "run_config.yaml").read_text())["model"]
    assert model["layernorm_zero_centered_gamma"] is True
    assert model["activation_func"]["_target_"] == "megatron.core.activations.fast_gelu"
    assert model["softmax_scale"] == json.loads((hf / "config.json").read_text())["query_pre_attn_scalar"] ** -0.5


def test_legacy_args_are_complete(tiny_hf, tmp_path: Path) -> None:
    hf = tiny_hf("qwen3")
    ckpt = tmp_path / "legacy"
    assert main(["import", str(hf), "--out", str(ckpt), "--out-iteration", "2"]) == 0
    args = load_pt(ckpt / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt")["args"]
    assert set(ARG_DEFAULTS) <= set(vars(args)) and args.iteration == 2 and args.multi_latent_attention is False
    assert args.layernorm_epsilon == json.loads((hf / "config.json").read_text())["rms_norm_eps"]


def test_negative_out_iteration_is_one_line(tiny_hf, tmp_path: Path, capsys) -> None:
    hf = tiny_hf("qwen3")
    capsys.readouterr()
    assert main(["import", str(hf), "--out", str(tmp_path / "x"), "--out-iteration", "-1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--out-iteration -1 must be 0 or more" in err and "\n" not in err and not (tmp_path / "x").exists()


def test_run_config_with_a_wrong_value_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "run_config.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_layers": 4, "tensor_model_parallel_size": "2"}}))
    with pytest.raises(BridgeError, match=r"tensor_model_parallel_size: '2'; expected whole numbers"):
        args_from_run_config(path)
    path.write_text("model: [unclosed")
    with pytest.raises(BridgeError, match="cannot read"):
        args_from_run_config(path)
    path.write_text(yaml.safe_dump({"train": {}}))
    with pytest.raises(BridgeError, match="no `model:` section"):
        args_from_run_config(path)


def test_sliding_window_is_written_in_flash_attentions_terms(tiny_hf, tmp_path: Path) -> None:
    """transformers' window W keeps the keys with q - k < W; Megatron's window_size (left, 0) goes to flash attention
    and Transformer Engine, which keep keys q - left .. q: W keys need left = W - 1."""
    hf = tiny_hf("phi3")  # Phi-3-mini's window, cut to 32 for the tiny model
    window = json.loads((hf / "config.json").read_text())["sliding_window"]
    assert main(["import", str(hf), "--out", str(tmp_path / "ckpt")]) == 0
    args = load_pt(tmp_path / "ckpt" / "release" / "mp_rank_00" / "model_optim_rng.pt")["args"]
    assert tuple(args.window_size) == (window - 1, 0)
