"""The bridge checkpoint folder: Megatron's tree plus `bridge.json` and `hf_meta/` (what export needs)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:
    import torch

from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout

log = logging.getLogger(__name__)

META_FILE = "bridge.json"
HF_META_DIR = "hf_meta"
#: HF files carried into `hf_meta/` and back out on export: config, generation config, tokenizer.
HF_META_PATTERNS: tuple[str, ...] = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "*.tiktoken",
)
TRANSFORMER_IMPLS = ("transformer_engine", "local")


@dataclass(frozen=True, kw_only=True)
class CheckpointMeta:
    """Everything `bridge.json` records; enough to read the Megatron tree back without guessing."""

    config: ModelConfig
    layout: ParallelLayout
    transformer_impl: str = "transformer_engine"
    dtype: str = "fp32"
    format: str = "torch"
    source: dict[str, Any] = field(default_factory=dict)
    bridge_version: str = "0.1.0"
    #: Vocabulary rows a checkpoint bridge did not write holds (Megatron-Bridge keeps the vocabulary unpadded, or
    #: pads it otherwise than `layout` would); None: `layout`'s padding, which bridge writes.
    padded_vocab: int | None = None

    @property
    def padded_vocab_size(self) -> int:
        return self.padded_vocab or self.layout.padded_vocab_size(self.config.vocab_size)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "architecture": self.config.architecture,
            "layout": self.layout.to_json(),
            "transformer_impl": self.transformer_impl,
            "dtype": self.dtype,
            "original_vocab_size": self.config.vocab_size,
            "padded_vocab_size": self.padded_vocab_size,
            "source": self.source,
            "config": self.config.to_json(),
            "bridge_version": self.bridge_version,
        }

    def save(self, folder: Path) -> None:
        (folder / META_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "CheckpointMeta":
        path = folder / META_FILE
        if not path.is_file():
            raise BridgeError(f"{folder} is not a bridge checkpoint (no {META_FILE}); create one with `bridge import`")
        try:
            data = json.loads(path.read_text())
            return cls(
                config=ModelConfig.from_json(data["config"]),
                layout=ParallelLayout(**data["layout"]),
                transformer_impl=data["transformer_impl"],
                dtype=data["dtype"],
                format=data["format"],
                source=data.get("source", {}),
                bridge_version=data.get("bridge_version", "?"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BridgeError(f"{path} is damaged ({type(exc).__name__}: {exc}); re-create the checkpoint") from exc


def copy_hf_meta(src: Path, dst: Path) -> None:
    """Copy config, generation config and tokenizer files (whatever of them exists) into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in HF_META_PATTERNS:
        for path in src.glob(pattern):
            if path.is_file():
                shutil.copy2(path, dst / path.name)


def hf_meta_bytes(src: Path) -> int:
    """Size of the files `copy_hf_meta` copies from `src` (a tokenizer can be tens of MB)."""
    return sum(path.stat().st_size for pattern in HF_META_PATTERNS for path in src.glob(pattern) if path.is_file())


def set_config_dtype(config_path: Path, dtype: "torch.dtype") -> None:
    """Record the weights' dtype in an HF config.json (`dtype` in transformers 5, `torch_dtype` before). The weights
    bridge writes are never quantised: a source's `quantization_config` (DeepSeek-V3's FP8, GPT-OSS's MXFP4) no longer
    describes them and goes."""
    config: dict[str, Any] = json.loads(config_path.read_text())
    config["dtype" if "dtype" in config else "torch_dtype"] = str(dtype).removeprefix("torch.")
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


#: errno values that mean the output's file system (or the user's quota on it) is full.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
#: Byte units for messages, largest first.
_UNITS = ((10**12, "TB"), (10**9, "GB"), (10**6, "MB"), (10**3, "kB"))


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool, *, sources: Sequence[Path] = (), needed: int = 0) -> Iterator[Path]:
    """Yield a fresh `<out>.tmp-<pid>-<random>` beside `out`; on success it replaces `out`, on any failure it is removed.

    `<out>.lock` is held (flock) throughout, so a second writer of the same `out` fails at once instead of mixing
    its files with this one's. An existing non-empty `out` is an error unless `overwrite`; then it is replaced only
    after the new output is complete, so a failed run never loses the old one. `sources` (what is being read) may
    not be, hold or lie inside `out`. `needed` bytes must be free before the first byte is written, and a disk that
    fills up anyway is reported in one line.
    """
    out = _checked_out(out, sources)
    with _locked(out):
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise BridgeError(f"{out} exists and is not empty; pass --overwrite to replace it or choose another --out")
        _remove_leftovers(out)
        check_free_space(out, needed)
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            yield tmp
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if _disk_full(exc):
                raise BridgeError(_no_space(out, needed)) from exc
            raise
        _replace(tmp, out)


def _checked_out(out: Path, sources: Sequence[Path]) -> Path:
    """`out` made absolute; refused when replacing it would delete the current folder or a source being read."""
    out = Path(os.path.abspath(out))
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise BridgeError(f"--out {out} is the current folder or holds it; name a new folder, e.g. --out {out / 'converted'}")
    for source in sources:
        src = Path(source).resolve()
        relation = ("is" if resolved == src else "holds" if resolved in src.parents
                    else "is inside" if src in resolved.parents else "")
        if relation:
            raise BridgeError(f"--out {out} {relation} the source {source}; choose an --out outside it (nothing being read "
                              "may be written over)")
    return out


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on `<out>.lock` (created beside `out`, removed afterwards); fail at once if taken."""
    lock = out.with_name(out.name + ".lock")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock_fd(lock, out)
    except OSError as exc:
        raise BridgeError(f"cannot create {lock} ({exc.strerror}); choose an --out in a folder you can write") from exc
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _lock_fd(lock: Path, out: Path) -> int:
    """A descriptor holding the lock. A holder removes the file when done, so the lock counts only if the file
    still is the one locked (else open it again)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BridgeError(f"another bridge command is writing {out} (it holds {lock}); wait for it to finish "
                              "or choose another --out") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _remove_leftovers(out: Path) -> None:
    """Temporary and replaced outputs of runs that died (their lock went with them; ours is held now)."""
    for path in sorted({*out.parent.glob(glob.escape(out.name) + ".tmp-*"), *out.parent.glob(glob.escape(out.name) + ".old-*")}):
        log.info("removing leftover %s from an interrupted run", path)
        shutil.rmtree(path, ignore_errors=True)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an old `out` is set aside first and removed last."""
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()


def _disk_full(exc: BaseException | None) -> bool:
    """ENOSPC/EDQUOT, raised directly or behind what a writer made of it (torch.save's RuntimeError)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def check_free_space(out: Path, needed: int) -> None:
    """Refuse to start writing `needed` bytes beside `out` when its file system has less free."""
    if needed > shutil.disk_usage(out.parent).free:
        raise BridgeError(_no_space(out, needed))


def _no_space(out: Path, needed: int) -> str:
    free = _size(shutil.disk_usage(out.parent).free) + " free"
    return (f"no space left on {_mount_point(out.parent)} writing {out}; "
            + (f"{_size(needed)} needed, {free}" if needed else free) + "; free some space or choose another --out")


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def _size(nbytes: int) -> str:
    """Bytes in the largest decimal unit that keeps a leading digit: `12.3 GB`, `512.0 MB`."""
    factor, unit = next(((f, u) for f, u in _UNITS if nbytes >= f), (1, "bytes"))
    return f"{nbytes / factor:.1f} {unit}" if factor > 1 else f"{nbytes} {unit}"
