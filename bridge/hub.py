"""Resolve a model source (local folder or Hub id) to a local folder, downloading only what conversion needs.

Also turns huggingface_hub's exceptions into one-line `BridgeError`s (`hub_error_message`), shared by
downloads here and by `bridge push`: the user should read what is wrong and what to do, not a traceback.
And `load_pretrained`, the one way bridge calls transformers' `from_pretrained`: never with remote code.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bridge.errors import BridgeError

logger = logging.getLogger(__name__)

#: Files a conversion needs from a Hub repo: config, generation config, tokenizer, weights (and the card).
DOWNLOAD_PATTERNS: tuple[str, ...] = (
    "README.md",  # a few kB; its metadata (license, base model) carries over to the card of a later push
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

_TOKEN_HINT = "pass --token, set HF_TOKEN or run `hf auth login`"


def endpoint() -> str:
    """The Hub the client talks to (`HF_ENDPOINT`, read by huggingface_hub at import)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_error_message(exc: BaseException, repo_id: str, revision: str | None, *, token_given: bool) -> str | None:
    """One line saying what went wrong with `repo_id` and what to do; None if `exc` is not a Hub error we know."""
    from huggingface_hub import errors

    where, rev = endpoint(), revision or "main"
    if isinstance(exc, errors.GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        if token_given:
            return f"{repo_id} is gated and your token has no access: request it at {where}/{repo_id}"
        return f"{repo_id} is gated: accept its terms at {where}/{repo_id}, then {_TOKEN_HINT}"
    if isinstance(exc, errors.RepositoryNotFoundError):
        if token_given:
            return f"no repo {repo_id} on {where} that your token can see; check the id and the token's access"
        return f"no repo {repo_id} on {where} (if it is private, {_TOKEN_HINT})"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{repo_id} has no revision {rev!r}; give an existing branch, tag or commit with --revision"
    if isinstance(exc, errors.OfflineModeIsEnabled) or (
        isinstance(exc, errors.LocalEntryNotFoundError) and "HF_HUB_OFFLINE" in str(exc)
    ):
        return f"HF_HUB_OFFLINE is set and {repo_id}@{rev} is not in the cache; unset it or give a local folder"
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return (
            f"cannot reach {where} to get {repo_id}@{rev} and it is not (fully) cached; "
            "check the network or HF_ENDPOINT, or give a local folder"
        )
    if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return f"{where} rejected the token (invalid or expired); {_TOKEN_HINT} with a valid one"
        if status == 403:
            return f"your token may not write to {repo_id}; use a token with write access to its namespace"
        return f"{where} answered {status} for {repo_id}: {str(exc).strip().splitlines()[-1]}"
    return None


def resolve_source(source: str, revision: str | None = None, token: str | None = None) -> Path:
    """Return a local folder holding `source`: the folder itself, or a Hub snapshot of the needed files.

    `token=None` lets huggingface_hub find one (`HF_TOKEN`, then the login cache). Only the files in
    `DOWNLOAD_PATTERNS` are fetched, so a repo's other weights formats and extras never download.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise BridgeError(f"{source} is a file; give the folder that holds config.json")
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise BridgeError(f"no folder named {source}; give a local HF folder or a Hub id like meta-llama/Llama-3.2-1B")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source, revision=revision, allow_patterns=list(DOWNLOAD_PATTERNS), token=token))
    except Exception as exc:  # huggingface_hub raises many kinds; each becomes one line
        message = hub_error_message(exc, source, revision, token_given=token is not None)
        if message is None:
            message = f"could not download {source}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        raise BridgeError(message) from exc
    _check_snapshot(folder, source, revision)
    logger.debug("resolved %s@%s to %s", source, revision or "main", folder)
    return folder


def _check_snapshot(folder: Path, source: str, revision: str | None) -> None:
    """A repo without config.json or safetensors weights is not something bridge can convert: say so now."""
    missing = [name for name, found in (
        ("config.json", (folder / "config.json").is_file()),
        ("*.safetensors weights", any(folder.glob("*.safetensors"))),
    ) if not found]
    if missing:
        raise BridgeError(
            f"{source}@{revision or 'main'} has no {' and no '.join(missing)}; "
            "bridge converts transformers checkpoints saved as safetensors"
        )


#: Files whose `auto_map` points transformers at Python files in the model folder.
_AUTO_MAP_FILES: tuple[str, ...] = ("config.json", "tokenizer_config.json")


def load_pretrained(auto_class: Any, folder: str | Path, **kwargs: Any) -> Any:
    """`auto_class.from_pretrained(folder, trust_remote_code=False, **kwargs)`.

    Left unset, transformers asks on the terminal whether to run the folder's Python files, and a `y`
    runs them: a checkpoint converter has no business executing code that comes with weights. A folder
    that transformers cannot load without its own code becomes one BridgeError line instead.
    """
    try:
        return auto_class.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except ValueError as exc:
        refs = _remote_code_refs(Path(folder))
        if not refs:
            raise
        raise BridgeError(
            f"{folder} needs remote code ({', '.join(refs)}), which bridge never runs; give a model whose "
            "architecture transformers implements itself (a newer transformers may have added it)"
        ) from exc


def _remote_code_refs(folder: Path) -> list[str]:
    """The `module.Class` references in the folder's `auto_map`s (config and tokenizer), sorted."""
    refs: set[str] = set()
    for name in _AUTO_MAP_FILES:
        try:
            auto_map = json.loads((folder / name).read_text()).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for value in auto_map.values() if isinstance(auto_map, dict) else ():
            refs.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str))
    return sorted(refs)
