"""How the daemon names a worker's entry point, without importing torch itself.

The daemon needs the target function and its settings to start a worker process; the
worker's real main imports torch (hundreds of MB the daemon has no use for). This
trampoline imports it in the worker, where the fork server has already loaded it.
"""

from __future__ import annotations

import socket
from typing import NamedTuple


class WorkerSettings(NamedTuple):
    num_threads: int
    extra_sys_paths: tuple[str, ...]
    shm_threshold_bytes: int  # tensors this large or larger go through shared memory


def run_worker(channel: socket.socket, settings: WorkerSettings) -> None:
    from server.worker.main import worker_main

    worker_main(channel, settings)
