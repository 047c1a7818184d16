"""The module that the ranks' fork server imports once, so that a rank starts in milliseconds, not seconds.

`bridge.launch` starts ranks from a multiprocessing fork server: a fresh, single-threaded process that
never touches CUDA, imports this module, then forks one child per rank. Spawned ranks each imported torch
and bridge again: 8.7 s to start 4 ranks on 2 cores, against 0.07 s forked from the server.

SIGINT is ignored here, so every rank starts with it ignored (the fork server hands its own start-up
dispositions on to its children) and takes Ctrl-C only once its worker has installed a handler: a rank
interrupted while starting would otherwise print a traceback.
"""
from __future__ import annotations

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)

import torch  # noqa: E402,F401
import torch.distributed  # noqa: E402,F401

import bridge.training.loop  # noqa: E402,F401  (training ranks)
import bridge.apps.verify  # noqa: E402,F401  (verify ranks)
