"""How a worker process ends, by name (README "Exit codes"). Here, not in server.app, so that
the worker can import it (tests/test_layers.py); it imports nothing, so neither does the daemon
load torch by reading it."""

from __future__ import annotations

from enum import IntEnum


class WorkerExitCode(IntEnum):
    # The daemon closed the worker's channel (a stop, a replacement): the worker's loop ends.
    OK = 0
    # The worker could not boot: a step of its start failed (server.worker.boot: it sends the
    # daemon BootFailed, naming the step and its error, first), or its parent was gone before the
    # parent-death signal took effect (os._exit: no one to tell).
    BOOT_FAILED = 1
