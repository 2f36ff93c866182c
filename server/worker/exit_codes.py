"""How a worker process ends, by name (README "Exit codes"). Here, not in server.app, so that
the worker can import it (tests/test_layers.py); it imports nothing, so neither does the daemon
load torch by reading it."""

from __future__ import annotations

from enum import IntEnum


class WorkerExitCode(IntEnum):
    # The daemon closed the worker's channel (a stop, a replacement): the worker's loop ends.
    OK = 0
    # The worker could not boot: its parent was gone before the parent-death signal took effect
    # (os._exit), or its start raised (multiprocessing exits 1, traceback on stderr).
    BOOT_FAILED = 1
