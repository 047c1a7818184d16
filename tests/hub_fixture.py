"""Pytest fixture `hub`: a local Hub server on 127.0.0.1 that the real huggingface_hub client talks to.

huggingface_hub 2.x reads `HF_ENDPOINT`, `HF_HOME`, the token path and `HF_HUB_DISABLE_XET` once, at
import time, into `huggingface_hub.constants` (and a few derived values: the resolve-URL template, the
trusted hosts, the module-level `HfApi` singleton's endpoint). Setting the environment after import
changes nothing, so the fixture sets the environment (for subprocesses, e.g. the `bridge` CLI) *and*
patches those constants (for this process), all undone by monkeypatch at teardown.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.hub_server import HubServer

#: Tokens the test Hub accepts: token -> user. Tests push as USER.
USER, OTHER_USER = "me", "someone-else"
TOKEN, OTHER_TOKEN = "hf_test_token_me", "hf_test_token_other"


def point_hub_client_at(url: str, hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make huggingface_hub (already imported or not) use the server at `url` and a cache under `hf_home`."""
    import huggingface_hub.constants as c
    import huggingface_hub.hf_api as hf_api
    import huggingface_hub.utils._http as hf_http

    env = {
        "HF_ENDPOINT": url, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(key, raising=False)

    constants = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": c.HF_URL_HOSTS | {urlsplit(url).hostname},
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in constants.items():
        monkeypatch.setattr(c, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(hf_http, "_HUB_ORIGINS", hf_http._HUB_ORIGINS | {hf_http._url_origin(url)})


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A fresh, empty test Hub (users `me` and `someone-else`) with the client pointed at it."""
    with HubServer(tokens={TOKEN: USER, OTHER_TOKEN: OTHER_USER}) as server:
        point_hub_client_at(server.url, tmp_path / "hf_home", monkeypatch)
        yield server


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama saved with `save_pretrained` (safetensors): what a Hub repo holds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def logits_of(folder: str | Path):
    """fp32 logits of the model in `folder` on a fixed batch, loaded with transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.arange(24).reshape(2, 12) % 128).logits


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    """An HF folder with a tiny random Llama."""
    return save_tiny_llama(tmp_path / "tiny-llama")
