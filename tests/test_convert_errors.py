"""Bad input: one clear line on stderr, exit 1, and nothing half-written."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from bridge.cli.main import main


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bridge ")]
    return code, "\n".join(err)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def expect_error(capsys, tmp_path: Path, needle: str, *argv: str) -> None:
    out = tmp_path / "out"
    code, err = run_cli(capsys, *argv, "--out", str(out))
    assert code == 1
    assert len(err.splitlines()) == 1 and "error:" in err, err
    assert needle in err, err
    assert not [p.name for p in tmp_path.iterdir() if p.name.split(".")[0] == "out"]  # no output, temporary folder, lock


def test_unknown_architecture_lists_supported(tiny_hf, tmp_path, capsys) -> None:
    src = copy_model(tiny_hf("llama31"), tmp_path / "m")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    expect_error(capsys, tmp_path, "architecture FalconForCausalLM is not supported; supported: DeepseekV3ForCausalLM, "
                 "Gemma2ForCausalLM, Gemma3ForCausalLM, Glm4MoeForCausalLM, GptOssForCausalLM, LlamaForCausalLM, "
                 "MistralForCausalLM, MixtralForCausalLM, Olmo2ForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, "
                 "Qwen2MoeForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, SmolLM3ForCausalLM", "import", str(src))


@pytest.mark.parametrize("flags,needle", [
    (["--tp", "3"], "num_attention_heads = 8 is not divisible by --tp = 3"),
    (["--tp", "8"], "num_key_value_heads (query groups) = 4 is not divisible by --tp = 8"),
    (["--pp", "3"], "num_hidden_layers = 4 is not divisible by --pp x --vpp = 3"),
    (["--pp", "2", "--vpp", "4"], "num_hidden_layers = 4 is not divisible by --pp x --vpp = 8"),
])
def test_indivisible_layouts(tiny_hf, tmp_path, capsys, flags, needle) -> None:
    expect_error(capsys, tmp_path, needle, "import", str(tiny_hf("llama31")), *flags)


def test_ffn_not_divisible_by_tp(tiny_hf, tmp_path, capsys) -> None:
    expect_error(capsys, tmp_path, "intermediate_size (FFN) = 130", "import", str(tiny_hf("llama31", intermediate_size=130)), "--tp", "4")


def test_truncated_safetensors(tiny_hf, tmp_path, capsys) -> None:
    src = copy_model(tiny_hf("llama31"), tmp_path / "m")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    expect_error(capsys, tmp_path, "truncated", "import", str(src))


def test_corrupt_safetensors_header(tiny_hf, tmp_path, capsys) -> None:
    src = copy_model(tiny_hf("llama31"), tmp_path / "m")
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    expect_error(capsys, tmp_path, "not a readable safetensors file", "import", str(src))


def sharded(src: Path, dst: Path) -> Path:
    """Split a single-file model into two shards with an index."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(dst / fname))
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_index_naming_missing_shard(tiny_hf, tmp_path, capsys) -> None:
    src = sharded(tiny_hf("llama31"), tmp_path / "m")
    (src / "b.safetensors").unlink()
    expect_error(capsys, tmp_path, "names shard b.safetensors", "import", str(src))


def test_weight_map_escaping_the_folder(tiny_hf, tmp_path, capsys) -> None:
    src = sharded(tiny_hf("llama31"), tmp_path / "m")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shutil.copy(src / "b.safetensors", tmp_path / "outside.safetensors")
    index["weight_map"] = {k: ("../outside.safetensors" if v == "b.safetensors" else v) for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(capsys, tmp_path, "points outside", "import", str(src))


def test_unconsumed_and_missing_tensors_are_listed(tiny_hf, tmp_path, capsys) -> None:
    src = copy_model(tiny_hf("llama31"), tmp_path / "m")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.extra_proj.weight"] = tensors.pop("model.layers.2.mlp.up_proj.weight")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    expect_error(capsys, tmp_path, "missing 1: model.layers.2.mlp.up_proj.weight; unexpected 1: model.layers.0.mlp.extra_proj.weight",
                 "import", str(src))


def test_bin_only_folder(tiny_hf, tmp_path, capsys) -> None:
    src = copy_model(tiny_hf("llama31"), tmp_path / "m")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    expect_error(capsys, tmp_path, "only pickled .bin weights", "import", str(src))


def test_existing_output_needs_overwrite(tiny_hf, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = run_cli(capsys, "import", str(tiny_hf("llama31")), "--out", str(out))
    assert code == 1 and "exists and is not empty; pass --overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(["import", str(tiny_hf("llama31")), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "precious.txt").exists() and (out / "bridge.json").is_file()


def test_missing_source_and_bad_checkpoint(tmp_path, capsys) -> None:
    code, err = run_cli(capsys, "import", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 1 and "no folder named" in err
    code, err = run_cli(capsys, "export", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 1 and "is not a bridge checkpoint" in err


def test_missing_rank_file_on_export(tiny_hf, tmp_path, capsys) -> None:
    ckpt = tmp_path / "ck"
    assert main(["import", str(tiny_hf("llama31")), "--out", str(ckpt), "--tp", "2"]) == 0
    (ckpt / "release/mp_rank_01/model_optim_rng.pt").unlink()
    expect_error(capsys, tmp_path, "missing rank file release/mp_rank_01/model_optim_rng.pt", "export", str(ckpt))


def test_interrupted_conversion_leaves_nothing(tiny_hf, tmp_path) -> None:
    """A SIGTERM mid-conversion (slowed down so it can be caught) removes the temporary folder."""
    out = tmp_path / "out"
    script = (
        "import sys, time\n"
        "from bridge.converters import engine\n"
        "put = engine.MegatronSink.put\n"
        "def slow_put(self, conv, tensor):\n"
        "    time.sleep(0.2)\n"
        "    put(self, conv, tensor)\n"
        "engine.MegatronSink.put = slow_put\n"
        "from bridge.cli.main import main\n"
        f"sys.exit(main(['import', {str(tiny_hf('llama31'))!r}, '--out', {str(out)!r}, '--tp', '2']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob("out.tmp-*/release")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob("out.tmp-*/release")), "conversion never started"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name, overrides, needle", [
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation gelu is not supported; supported: gelu_pytorch_tanh"),
    ("gemma3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope types 'yarn' (full layers)"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "transformers' Gemma 3 attention does not apply it"),
    ("olmo2", {"hidden_act": "gelu"}, "hidden_act gelu is not supported"),
])
def test_gemma_and_olmo2_options_their_block_cannot_hold_are_one_line(name: str, overrides: dict, needle: str) -> None:
    from bridge.errors import BridgeError
    from bridge.models import family
    from bridge.tiny import tiny_config
    from tests.model_fixtures import MODEL_OVERRIDES, real_config

    hf = tiny_config(real_config(name), **{**MODEL_OVERRIDES.get(name, {}), **overrides})
    with pytest.raises(BridgeError, match=re.escape(needle)):
        family(hf.architectures[0]).config_from_hf(hf)
