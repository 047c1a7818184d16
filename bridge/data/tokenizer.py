"""Load a Hugging Face tokenizer from a local folder, a Hub id, or a bridge checkpoint folder.

A bridge checkpoint keeps the HF config and tokenizer files in `hf_meta/` next to `bridge.json`,
so `--tokenizer <checkpoint>` works without the original model folder.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from bridge.errors import BridgeError
from bridge.hub import load_pretrained

logger = logging.getLogger(__name__)

#: Files a tokenizer needs from a Hub repo (never weights).
TOKENIZER_PATTERNS: tuple[str, ...] = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "*.model",
    "chat_template*",
    "config.json",
)
BRIDGE_MARKER = "bridge.json"
BRIDGE_HF_META = "hf_meta"


def resolve_tokenizer_dir(source: str, revision: str | None = None, token: str | None = None) -> Path:
    """A local folder with the tokenizer files of `source` (downloading only those from the Hub)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / BRIDGE_MARKER).is_file():
            meta = path / BRIDGE_HF_META
            if not meta.is_dir():
                raise BridgeError(f"{source} is a bridge checkpoint without {BRIDGE_HF_META}/; give the HF model folder")
            return meta
        return path
    if path.exists():
        raise BridgeError(f"{source} is a file; give the folder that holds tokenizer.json / tokenizer_config.json")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise BridgeError(f"no folder named {source}; give a local tokenizer folder, a bridge checkpoint or a Hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source,
                revision=revision,
                allow_patterns=list(TOKENIZER_PATTERNS),
                token=token or os.environ.get("HF_TOKEN"),
            )
        )
    except Exception as exc:  # huggingface_hub raises many kinds; give one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise BridgeError(
            f"could not download the tokenizer of {source} ({type(exc).__name__}: {first}); "
            "check the id, your network and HF_TOKEN, or give a local folder"
        ) from exc


def load_tokenizer(source: str, revision: str | None = None, token: str | None = None, *, name: str | None = None,
                   advice: str = "pass --tokenizer with an HF model folder or Hub id whose tokenizer loads") -> Any:
    """An HF tokenizer (`PreTrainedTokenizerBase`) for `source`; BridgeError if it cannot be loaded. `name` is how
    errors call the source (what the user gave, where `source` is a folder bridge derived from it)."""
    folder = resolve_tokenizer_dir(source, revision=revision, token=token)
    name = name or source
    from transformers import AutoTokenizer

    try:
        tokenizer = load_pretrained(AutoTokenizer, str(folder))
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for unusable folders
        reason = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__  # transformers': several lines
        reason = reason if len(reason) <= 400 else reason[:397] + "..."
        raise BridgeError(f"could not load the tokenizer of {name}: {reason}; {advice}") from exc
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise BridgeError(f"{name} holds no tokenizer files (tokenizer.json, tokenizer_config.json); {advice}")
    if not getattr(tokenizer, "is_fast", False):
        logger.warning("%s is a slow (Python) tokenizer; preparing data will be much slower", source)
    return tokenizer


def vocab_size(tokenizer: Any) -> int:
    """All ids the tokenizer can emit, added tokens included (what sizes the token dtype)."""
    return max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0))


def eod_id(tokenizer: Any) -> int:
    """The end-of-document id: the tokenizer's EOS token (Megatron's `tokenizer.eod`)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise BridgeError("the tokenizer has no eos_token, so --append-eod has nothing to append; drop the flag")
    return int(eos)


def render_chat(tokenizer: Any, messages: Any) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` with the chat template; return the text and the character spans of the
    assistant contents in it.

    The spans are found by locating each message's content in the rendered text, in order. This
    works with any template (no `{% generation %}` markers needed), as long as the template copies
    the content verbatim; raises ValueError with a short reason otherwise.
    """
    _check_messages(messages)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja2 TemplateError and friends: the record, not bridge, is at fault
        raise ValueError(f"the chat template rejected the messages: {exc}") from None
    spans: list[tuple[int, int]] = []
    cursor = 0
    for number, message in enumerate(messages):
        content = (message.get("content") or "").strip()
        if not content:
            continue
        start = text.find(content, cursor)
        if start < 0:
            raise ValueError(f"the chat template does not copy message {number} ({message['role']}) verbatim")
        cursor = start + len(content)
        if message["role"] == "assistant":
            spans.append((start, cursor))
    if not spans:
        raise ValueError("no assistant message with content, so nothing to train on")
    return text, spans


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"expected a non-empty list of messages, got {type(messages).__name__}")
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {number} has no 'role'")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"message {number} content is {type(content).__name__}; only text content is supported")


def assistant_mask(offsets: np.ndarray, ids: np.ndarray, spans: list[tuple[int, int]],
                   special_ids: np.ndarray) -> np.ndarray:
    """uint8 mask over tokens: 1 for tokens overlapping an assistant span, and for the special token
    right after each span (the end-of-turn token, so the model learns to stop). offsets: (T, 2)."""
    mask = np.zeros(len(ids), dtype=np.uint8)
    if len(ids) == 0:
        return mask
    starts, ends = offsets[:, 0], offsets[:, 1]
    for span_start, span_end in spans:
        inside = (starts < span_end) & (ends > span_start)
        mask |= inside
        hits = np.flatnonzero(inside)
        after = int(hits[-1]) + 1 if hits.size else -1
        if 0 <= after < len(ids) and np.isin(ids[after], special_ids):
            mask[after] = 1
    return mask
