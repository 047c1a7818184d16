"""Resolve a model source (local folder or Hub id) to a local folder, downloading only what conversion needs."""
from __future__ import annotations

import os
from pathlib import Path

from bridge.errors import BridgeError

#: Files a conversion needs from a Hub repo: config, generation config, tokenizer, weights.
DOWNLOAD_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "*.model",
    "chat_template*",
    "*.safetensors",
    "model.safetensors.index.json",
)


def resolve_source(source: str, revision: str | None = None, token: str | None = None) -> Path:
    """Return a local folder holding `source`: the folder itself, or a Hub snapshot of the needed files."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise BridgeError(f"{source} is a file; give the folder that holds config.json")
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise BridgeError(f"no folder named {source}; give a local HF folder or a Hub id like meta-llama/Llama-3.2-1B")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source,
                revision=revision,
                allow_patterns=list(DOWNLOAD_PATTERNS),
                token=token or os.environ.get("HF_TOKEN"),
            )
        )
    except Exception as exc:  # huggingface_hub raises many kinds; give one line
        raise BridgeError(f"could not download {source}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
