"""What `deployd serve` exits with, by name (README "Exit codes"; Docker and Kubernetes
docs depend on the numbers, so they never change). Worker processes' codes are
server.worker.exit_codes.WorkerExitCode (the worker may not import server.app)."""

from __future__ import annotations

from enum import IntEnum

from server.worker.exit_codes import WorkerExitCode

__all__ = ["ExitCode", "WorkerExitCode"]


class ExitCode(IntEnum):
    # A clean stop: SIGTERM or SIGINT (a second signal skips the drain, and is still 0).
    OK = 0
    # The daemon could not start: its address is taken, TLS files are unreadable, or a worker
    # could not boot (an unexpected error also ends Python with 1).
    STARTUP_ERROR = 1
    # A bad config (file, environment, flag; argparse's usage errors are 2 as well), or a model of
    # `models` could not load at start and models_on_error is "stop".
    CONFIG_ERROR = 2
