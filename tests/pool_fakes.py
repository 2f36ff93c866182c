"""Stand-ins for the pool's unit tests: a worker process that runs no model code, and a handle
that runs no process.

`answering_worker` is a real worker process target (Supervisor(target=...)): it greets like
a worker and answers every request with its pid. Importing this module in a worker must stay
cheap: it imports nothing of the daemon but the protocol (worker_failing_boot_on_request, the
real worker, imports it when it runs).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

from server.ipc import protocol
from server.pool.worker_handle import WorkerState


def answering_worker(channel: socket.socket, settings: Any) -> None:
    """Greet, then answer each request with this process's pid; HasAttr(_, "sleep:S") sleeps
    S seconds first (a call that keeps its worker busy)."""
    protocol.write_frame_blocking(channel, protocol.encode_frame(0, protocol.Ready(os.getpid()), []))
    while True:
        try:
            frame = protocol.read_frame_blocking(channel)
        except (EOFError, ConnectionError):
            return
        message = frame.message
        if isinstance(message, protocol.HasAttr) and message.name.startswith("sleep:"):
            time.sleep(float(message.name.removeprefix("sleep:")))
        reply = protocol.encode_frame(frame.request_id, protocol.Result(os.getpid()), [])
        protocol.write_frame_blocking(channel, reply)


class AnsweringHandle:
    """Enough of a WorkerHandle for the dispatcher: answers every request at once with its pid,
    or, while `held` is set, once it is resolved."""

    def __init__(self, index: int, pid: int | None = None) -> None:
        self.index = index
        self.pid = pid if pid is not None else 1000 + index
        self.state = WorkerState.IDLE  # as the supervisor leaves a worker that starts serving
        self.calls_served = 0
        self.alive = True
        self.held: asyncio.Future[Any] | None = None
        self.seen: list[str] = []

    def __repr__(self) -> str:
        return f"<fake worker {self.index} pid={self.pid} {self.state}>"

    def send(self, message: Any, buffers: list[Any]) -> asyncio.Future[Any]:
        self.seen.append(type(message).__name__)
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        frame = protocol.Frame(0, protocol.Result(self.pid), [], {})
        if self.held is None:
            reply.set_result(frame)
        else:
            self.held.add_done_callback(lambda _: reply.done() or reply.set_result(frame))
        return reply

    def abandon(self, reply: asyncio.Future[Any], grace: float) -> None:
        pass


FAIL_BOOT = "fail-boot"


def worker_failing_boot_on_request(channel: socket.socket, settings: Any) -> None:
    """The real worker (server.worker.main), whose boot fails at its address-space limit while a
    file FAIL_BOOT exists in the directory settings.extra_sys_paths[0]: a slot whose
    replacements cannot boot, for as long as a test wants."""
    from server.worker.main import worker_main

    if os.path.exists(os.path.join(settings.extra_sys_paths[0], FAIL_BOOT)):
        settings = settings._replace(max_address_space_bytes=2**20)
    worker_main(channel, settings)
