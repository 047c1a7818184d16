"""`bridge push`: upload an HF folder, or a Megatron checkpoint exported on the fly, to the Hub with a model card.

The whole upload is ONE commit (weights, config, tokenizer, README.md, loss curve), so the repo has
either all of it or none of it. Transient failures (dropped connections, 5xx) retry the whole push:
LFS files already uploaded are skipped by the Hub and unchanged files are dropped from the commit by
huggingface_hub, so a retry (or a re-push of the same content) costs little and, when the content is
already there, makes no commit at all.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bridge.errors import BridgeError
from bridge.hub import hub_error_message
from bridge.processes import process_alive
from bridge.apps.model_card import ModelCard, build_model_card

logger = logging.getLogger(__name__)

#: Seconds to wait before each retry of a push that failed on a transient error.
RETRY_WAITS_S: tuple[float, ...] = (2.0, 10.0)
#: Weight files of an earlier push that the new commit deletes when it does not bring them again,
#: so the repo never mixes shards of two models.
STALE_WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
#: Local files never uploaded.
SKIP_NAMES: frozenset[str] = frozenset({".git", ".cache", "__pycache__", ".DS_Store"})
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class _Target:
    """Where a push goes and as whom; the token stays out of repr so it never reaches a log."""

    repo_id: str
    revision: str | None
    private: bool
    token: str | None = field(repr=False)
    endpoint: str | None


def push_to_hub(
    source: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    adapter: bool = False,
) -> str:
    """Push `source` (HF folder, or bridge checkpoint folder with `bridge.json`) to `repo_id`; return the commit URL.

    The URL ends with the commit oid. `revision` is a branch, created from `main` if missing. `token=None`
    lets huggingface_hub find one (`HF_TOKEN`, then the login cache). `endpoint` overrides `HF_ENDPOINT`.
    `private` applies when the repo is created; an existing repo keeps its visibility. `adapter`: push a LoRA run's
    adapter as a PEFT folder (without it a LoRA run is pushed merged into its base).
    """
    src = Path(source).expanduser()
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise BridgeError(f"{repo_id!r} is not a repo id; give it as <user or org>/<name>, e.g. me/my-llama")
    target = _Target(repo_id, revision, private, token, endpoint)
    with _as_hf_folder(src, adapter) as (folder, checkpoint):
        card = build_model_card(folder, repo_id, checkpoint=checkpoint, revision=revision)
        message = commit_message or f"{'Export' if checkpoint else 'Upload'} {src.name} with bridge"
        return _push_with_retries(folder, card, message, target)


@contextmanager
def _as_hf_folder(src: Path, adapter: bool = False) -> Iterator[tuple[Path, Path | None]]:
    """(HF folder to upload, checkpoint it came from). A checkpoint is exported into a staging folder
    beside it (streamed, memory bounded by export), removed when the push is over; a LoRA run merged into its base,
    or with `adapter` as a PEFT folder."""
    if (src / "bridge.json").is_file():
        from bridge.apps.adapter import export  # imported here: pushing an HF folder never loads torch

        with _staging_dir(src) as tmp:
            logger.info("exporting %s to Hugging Face %s for the push", src, "PEFT format" if adapter else "format")
            yield Path(export(src, tmp / "hf", adapter=adapter)), src
    elif adapter:
        raise BridgeError(f"--adapter pushes a bridge LoRA run's adapter; {src} is not a bridge checkpoint")
    elif (src / "config.json").is_file() or (src / "adapter_config.json").is_file():
        yield src, None
    elif src.is_dir():
        raise BridgeError(f"{src} holds neither config.json (an HF folder) nor bridge.json (a bridge checkpoint)")
    else:
        raise BridgeError(f"no folder {src}; give an HF folder or a bridge checkpoint folder")


@contextmanager
def _staging_dir(src: Path) -> Iterator[Path]:
    """A new hidden `.<name>.push-<host>-<pid>-<hex>` folder beside `src`, removed when the push ends.

    A push killed outright (SIGKILL, OOM killer, power loss) cannot remove its own: the host and PID in
    the name let every later push beside it recognise such a folder and remove it.
    """
    _remove_stale_staging(src.parent)
    tmp = src.parent / f".{src.name}.push-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise BridgeError(f"cannot create {tmp} to export {src} for the push ({exc.strerror}); export it yourself "
                          f"(bridge export {src} --out <folder>) and push that folder") from exc
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_staging(folder: Path) -> None:
    """Remove the staging folders in `folder` of pushes on this host whose process is gone.

    Only this host's: on a shared file system another machine's PID says nothing about this one's processes.
    """
    pattern = re.compile(rf"\..+\.push-{re.escape(socket.gethostname())}-(\d{{1,9}})-[0-9a-f]{{8}}")
    for path in sorted(folder.glob(".*.push-*")):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not process_alive(int(match[1])):
            logger.info("removing %s, left by a push that was killed", path)
            shutil.rmtree(path, ignore_errors=True)




def _is_transient(exc: BaseException) -> bool:
    """A dropped connection, a timeout or a 5xx/429 anywhere in the exception's cause chain."""
    from huggingface_hub.errors import HfHubHTTPError

    try:  # huggingface_hub 2.x talks through httpx2; older releases through requests
        from httpx2 import TransportError as transport_errors
    except ImportError:
        from requests.exceptions import ConnectionError as transport_errors  # type: ignore[no-redef]
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, transport_errors):
            return True
        if isinstance(seen, HfHubHTTPError) and seen.response is not None:
            return seen.response.status_code in _TRANSIENT_STATUS
        seen = seen.__cause__ or seen.__context__
    return False


def _push_with_retries(folder: Path, card: ModelCard, message: str, target: _Target) -> str:
    """Run `_push_once`, retrying it on transient errors; every other Hub error becomes one BridgeError line."""
    attempts, repo_id = len(RETRY_WAITS_S) + 1, target.repo_id
    for attempt in range(1, attempts + 1):
        try:
            return _push_once(folder, card, message, target)
        except BridgeError:
            raise
        except Exception as exc:  # huggingface_hub and httpx raise many kinds
            if _is_transient(exc) and attempt < attempts:
                wait = RETRY_WAITS_S[attempt - 1]
                logger.warning("push to %s failed (%s); retry %d/%d in %.0fs", repo_id, type(exc).__name__,
                               attempt, attempts - 1, wait)
                time.sleep(wait)
                continue
            reason = hub_error_message(exc, repo_id, target.revision, token_given=target.token is not None)
            if reason is None and _is_transient(exc):
                reason = (f"push to {repo_id} failed {attempts} times ({type(exc).__name__}); the repo holds the "
                          "whole commit or none of it: run the same command again to finish")
            raise BridgeError(reason or f"push to {repo_id} failed: {type(exc).__name__}: {exc}") from exc
    raise AssertionError("unreachable")


def _push_once(folder: Path, card: ModelCard, message: str, target: _Target) -> str:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=target.endpoint, token=target.token)
    repo_id, revision = target.repo_id, target.revision
    api.create_repo(repo_id, private=target.private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = _operations(api, folder, card, repo_id, revision)
    logger.info("pushing %d files from %s to %s@%s", len(operations), folder, repo_id, revision or "main")
    info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision)
    logger.info("pushed: %s", info.commit_url)
    return info.commit_url


def _operations(api, folder: Path, card: ModelCard, repo_id: str, revision: str | None) -> list:
    """Adds for every local file (README.md and assets from `card`), deletes for stale remote weights."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    generated = {"README.md": card.text.encode(), **card.assets}
    adds = [
        CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path))
        for rel, path in _local_files(folder) if rel not in generated
    ]
    adds += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in generated.items()]
    uploading = {op.path_in_repo for op in adds}
    remote = api.list_repo_files(repo_id, revision=revision)
    stale = sorted(p for p in remote if p.endswith(STALE_WEIGHT_SUFFIXES) and p not in uploading)
    if stale:
        logger.info("deleting %d weight files of an earlier push: %s", len(stale), ", ".join(stale))
    return adds + [CommitOperationDelete(path_in_repo=p) for p in stale]


def _local_files(folder: Path) -> list[tuple[str, Path]]:
    """(path in repo, local path) of every file under `folder`, sorted, without VCS/cache folders."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not SKIP_NAMES.intersection(rel.parts):
            out.append((rel.as_posix(), path))
    return out


def demo_push(folder: str | Path, repo_id: str = "demo/tiny-llama", *, kept: bool = True) -> str:
    """For `bridge demo`: push `folder` to a throw-away local Hub and say so in one line.

    The local Hub (`tests/hub_server.py`) exists only in a source checkout, which is where the demo
    runs from; without it, the line says how to push for real instead. `kept`: whether `folder` outlives the
    demo; if not, the line does not suggest pushing it.
    """
    how = (f"to publish it: bridge push {folder} <user>/<name> (token from HF_TOKEN, --token or `hf auth login`)"
           if kept else "to publish it, run `bridge demo --keep` and push the folder it names with `bridge push`")
    root = Path(__file__).resolve().parents[2]  # the checkout holding bridge/apps/push.py
    if not (root / "tests" / "hub_server.py").is_file():
        return how
    if str(root) not in sys.path:
        sys.path.append(str(root))  # `tests` is not an installed package
    from tests.hub_server import HubServer

    user = repo_id.split("/")[0]
    with HubServer(tokens={"demo-token": user}, lfs=False) as hub:  # lfs=False: the demo's client may use Xet
        url = push_to_hub(folder, repo_id, token="demo-token", endpoint=hub.url)
    return f"pushed to a local test Hub (stopped now): {url}; {how}"
