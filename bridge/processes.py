"""Whether a process is alive, by pid: what the launcher's ranks watch, and what a push checks before removing
the staging folder a killed push left behind. Standard library only, so that pushing never imports torch."""
from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (one of another user counts: it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
