"""bridge never runs the Python files that come with a model (`auto_map` in config.json or tokenizer_config.json).

Left to itself, transformers asks on the terminal whether to run them, and a `y` does. Each test answers
`y` to any such prompt (`input` patched, as a user at a terminal would) and checks that the model folder's
code did not run: it would have written a marker file.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from bridge.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("bridge", "converters", "models", "cli")


def _code_that_marks(marker: Path, base: str) -> str:
    """A module that, when executed, writes `marker` (an absolute path: transformers runs a copy from its cache)."""
    return (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
            f"from transformers import {base}\n")


@pytest.fixture
def answer_yes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every prompt is answered `y`; the prompts asked are recorded."""
    asked: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
    return asked


def _remote_config_model(folder: Path, marker: Path) -> Path:
    """A model whose config.json has a custom model_type and an auto_map to configuration_evil.py."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["EvilForCausalLM"], "model_type": "evil", "hidden_size": 8,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
    }))
    (folder / "configuration_evil.py").write_text(
        _code_that_marks(marker, "PretrainedConfig") + "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _one_error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"bridge {command}: error: "), err
    return err[0]


def test_import_of_a_remote_code_model_refuses_without_running_it(tmp_path, capsys, answer_yes):
    marker = tmp_path / "MARKER"
    src = _remote_config_model(tmp_path / "evil", marker)
    assert main(["import", str(src), "--out", str(tmp_path / "ckpt")]) == 1
    assert not marker.exists() and answer_yes == [] and not (tmp_path / "ckpt").exists()
    line = _one_error_line(capsys, "import")
    assert "needs remote code (configuration_evil.EvilConfig, modeling_evil.EvilForCausalLM), which bridge never runs;" in line


def _remote_tokenizer(folder: Path, marker: Path) -> Path:
    """A folder whose tokenizer_config.json maps AutoTokenizer to tokenization_evil.py."""
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    (folder / "tokenization_evil.py").write_text(
        _code_that_marks(marker, "PreTrainedTokenizer") + "class EvilTokenizer(PreTrainedTokenizer):\n    pass\n")
    return folder


def test_data_prepare_with_a_remote_code_tokenizer_refuses_without_running_it(tmp_path, capsys, answer_yes):
    marker = tmp_path / "MARKER"
    tok = _remote_tokenizer(tmp_path / "tok", marker)
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    code = main(["data", "prepare", str(tmp_path / "data.jsonl"), "--tokenizer", str(tok),
                 "--output-prefix", str(tmp_path / "out"), "--no-progress"])
    assert code == 1 and not marker.exists() and answer_yes == []
    line = _one_error_line(capsys, "data")
    assert "needs remote code (tokenization_evil.EvilTokenizer), which bridge never runs;" in line


def test_verify_tokenizer_with_remote_code_is_not_run(tiny_llama, tmp_path, answer_yes):
    """verify falls back to byte ids when the tokenizer cannot be used; it must not get there by running it."""
    from bridge.apps.verify import encode

    marker = tmp_path / "MARKER"
    ids = encode(_remote_tokenizer(tiny_llama, marker), ["hi"], vocab_size=128)
    assert not marker.exists() and answer_yes == []
    assert ids == [[ord("h"), ord("i")]]


def _from_pretrained_calls(path: Path) -> list[int]:
    """Line numbers of `<anything>.from_pretrained(...)` calls in a source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained"]


def test_every_from_pretrained_goes_through_load_pretrained():
    """`bridge.hub.load_pretrained` passes trust_remote_code=False; a direct call elsewhere could forget it."""
    direct = [f"{path.relative_to(ROOT)}:{line}" for folder in PRODUCT for path in sorted((ROOT / folder).rglob("*.py"))
              for line in _from_pretrained_calls(path) if path != ROOT / "bridge" / "hub.py"]
    assert direct == []
