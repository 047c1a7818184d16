"""User-facing errors: one exception type whose message is the one line the CLI prints."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

#: errno values of a write refused for want of space: the device is full, or the user's quota is.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class BridgeError(Exception):
    """A problem with the user's input or environment, not a bug in bridge.

    The message must say what is wrong and what to do; the CLI prints it as one line and
    exits non-zero without a traceback.
    """


def _is_no_space(exc: BaseException | None) -> bool:
    """Whether `exc` or an error it was raised from or while handling is a full device or quota (torch.save
    reports a failed write of its file object as a RuntimeError raised while handling the OSError)."""
    for _ in range(8):  # chains are short; the bound only guards against a cycle
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the filesystem that holds `path` (or would hold it)."""
    current = Path(os.path.abspath(path))
    while not os.path.ismount(current):
        current = current.parent
    return current


@contextlib.contextmanager
def disk_space_checked(path: str | os.PathLike, advice: str) -> Iterator[None]:
    """Turn a full disk while writing `path` into one line naming the filesystem, the file and what to do."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not _is_no_space(exc):
            raise
        raise BridgeError(f"no space left on {mount_point(path)} writing {path}; {advice}") from exc
