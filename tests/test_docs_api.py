"""docs/api.md's examples run as written, against the local test Hub holding a tiny Llama-3.2-1B."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from bridge.tiny import save_tiny_model, tiny_config
from tests.hub_fixture import point_hub_client_at
from tests.hub_server import HubServer
from tests.model_fixtures import real_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
REPO = "meta-llama/Llama-3.2-1B"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_api_doc_examples_run(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import HfApi

    model = save_tiny_model(tiny_config(real_config("llama32-tied")), tmp_path / "model")
    with HubServer(tokens={"hf_meta": "meta-llama"}) as hub:
        point_hub_client_at(hub.url, tmp_path / "uploader_home", monkeypatch)
        api = HfApi(endpoint=hub.url, token="hf_meta")
        api.create_repo(REPO)
        api.upload_folder(folder_path=str(model), repo_id=REPO)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        env.pop("HF_TOKEN", None)
        blocks = examples()
        assert len(blocks) == 2
        outputs = []
        for i, code in enumerate(blocks):
            script = tmp_path / f"example{i}.py"
            script.write_text(code)
            proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            outputs.append(proc.stdout)
    assert outputs[0].startswith("LlamaForCausalLM ModelConfig(")
    n = len(load_file(model / "model.safetensors"))
    assert outputs[1].strip() == str([n, 0, 0, 0])  # rank 0 received every HF weight, the others none
    ref = load_file(model / "model.safetensors")
    for out in ("ckpt-hf", "out-hf"):
        got = load_file(tmp_path / out / "model.safetensors")
        assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref), out
    assert (tmp_path / "ckpt" / "bridge.json").is_file()

