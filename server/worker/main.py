"""A worker process's entry point: greet the daemon, then serve requests until the channel closes.

Imported by the fork server before any worker exists, so that torch is loaded once
and every worker forked from it starts warm. Nothing here may start threads or run
torch ops at import time: a fork after OpenMP has started hangs the child.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import warnings
from typing import NamedTuple

import torch

from server.protocol import Ready, read_frame_blocking, write_frame_blocking
from server.worker.runtime import Runtime


class WorkerSettings(NamedTuple):
    num_threads: int
    extra_sys_paths: tuple[str, ...]


def worker_main(channel: socket.socket, settings: WorkerSettings) -> None:
    # Ctrl-C reaches the whole process group; the daemon decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # torch.package's unpickler still uses TypedStorage; the warning says nothing to an operator.
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    torch.set_num_threads(settings.num_threads)
    sys.path.extend(settings.extra_sys_paths)
    runtime = Runtime()
    write_frame_blocking(channel, 0, Ready(os.getpid()), [])
    while True:
        try:
            frame = read_frame_blocking(channel)
        except (EOFError, ConnectionError):
            return  # the daemon closed the channel, or died: either way, stop.
        reply, buffers = runtime.handle(frame.message, frame.buffers)  # type: ignore[arg-type]
        write_frame_blocking(channel, frame.request_id, reply, buffers)
