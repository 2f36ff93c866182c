"""The workers' data ports, as the daemon keeps them: which port each slot serves on, what
clients are told (deployd.v1 Endpoints), and the watch over the calls the daemon never sees.

    new worker ──replay, routes──> open(worker): OpenDataPort(slot, port) ──> its port, kept
    Endpoints  <── endpoints(): each serving worker's advertised host:port, pid, generation
    every 0.1 s: watch() reads the call board (server.ipc.call_board):
        a call running over pool.max_call_seconds, or past its caller's deadline by
        pool.abandoned_call_grace_seconds ──> that worker's stacks to the log, then it is
        killed (and so replaced)

A slot keeps its port: with pool.data_ports = P, slot i serves on P + i; with 0, the first
worker in a slot takes any free port and its replacements take the same one (or, if it was
taken meanwhile, another, which the next Endpoints says).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from server.errors import DeploydError
from server.ipc import protocol
from server.ipc.call_board import Row, board_bytes, clear_row, read_label, read_row
from server.ipc.shm import Segment
from server.pool.events import WorkerEvent, WorkerExited
from server.pool.worker_handle import WorkerHandle, describe_call
from server.pool.worker_output import RunningCall

log = logging.getLogger(__name__)

_WATCH_SECONDS = 0.1


class Endpoint(NamedTuple):
    slot: int
    address: str  # host:port, the host as clients should dial it
    pid: int
    generation: int  # how many workers the slot has had


class Exit(NamedTuple):
    """A worker that ended, as a client whose call on its port failed asks about it."""

    slot: int
    pid: int
    reason: str
    call_killed_worker: bool  # it ended itself running the call call_id
    call_id: int  # the call it was running on its data port (0: none, or not ours)


_EXITS_KEPT = 256


class DataPorts:
    def __init__(
        self,
        slots: int,
        first_port: int,
        host: str,
        advertise_host: str,
        max_call_seconds: float,
        abandoned_call_grace: float,
    ) -> None:
        self._first_port = first_port
        self._host = host
        self._advertise_host = advertise_host or host
        self._max_call_seconds = max_call_seconds
        self._grace = abandoned_call_grace
        self.board = Segment(board_bytes(slots))
        self._ports: dict[int, int] = {}  # slot -> the port its worker serves on
        self._opened: dict[int, int] = {}  # slot -> how many workers opened a port in it
        self._watch: asyncio.Task[None] | None = None
        self.exits: collections.deque[Exit] = collections.deque(maxlen=_EXITS_KEPT)

    def on_worker_event(self, event: WorkerEvent) -> None:
        """Keep each worker's end with the call it was running on its port (the call board's row
        is still the dead worker's: a replacement clears it only when its port opens)."""
        if not isinstance(event, WorkerExited) or event.stopped:
            return
        worker = event.worker
        row = self.row(worker.index)
        running = row.running_since_ns != 0
        killed_by_call = worker.ended_by_call and running
        self.exits.append(Exit(worker.index, worker.pid, event.reason, killed_by_call, row.call_id if running else 0))

    async def open(self, worker: WorkerHandle) -> None:
        """Open a new worker's data port (its replay and routes done): its slot's port."""
        slot = worker.index
        clear_row(self.board.buffer, slot)
        worker.call_elsewhere = lambda: self.running_call(slot)
        wanted = self._ports.get(slot, self._first_port + slot if self._first_port else 0)
        try:
            port, _ = await worker.request(protocol.OpenDataPort(slot, wanted), [])
        except DeploydError as error:
            if self._first_port or not wanted:
                raise
            # A free port picked before is taken now: any other will do, Endpoints says which.
            log.warning("worker %d: data port %d is taken (%s); taking another", slot, wanted, error)
            port, _ = await worker.request(protocol.OpenDataPort(slot, 0), [])
        self._ports[slot] = int(port)
        self._opened[slot] = self._opened.get(slot, 0) + 1
        log.info("worker %d serves calls on %s:%d", slot, self._host, port)

    def endpoints(self, serving: Iterable[tuple[int, int]]) -> list[Endpoint]:
        """Where the serving workers (slot, pid) take calls."""
        return [
            Endpoint(slot, f"{_host_for_address(self._advertise_host)}:{self._ports[slot]}", pid, self._opened[slot])
            for slot, pid in sorted(serving)
            if slot in self._ports
        ]

    def row(self, slot: int) -> Row:
        return read_row(self.board.buffer, slot)

    def running_call(self, slot: int) -> RunningCall | None:
        """The call a slot's worker runs on its data port, in words; None if it runs none."""
        row = self.row(slot)
        if not row.running_since_ns:
            return None
        parts = read_label(self.board.buffer, slot)
        if len(parts) != 3:  # it moved on to another call meanwhile
            return RunningCall(f"call {row.call_id} on its data port" if row.call_id else "a call on its data port")
        kind, object_id, member = parts
        return RunningCall(f"{describe_call(kind, object_id, member)} on its data port", object_id)

    def start_watch(self, workers: Callable[[], Iterable[WorkerHandle]]) -> None:
        if self._watch is None:
            self._watch = asyncio.create_task(self._watch_calls(workers), name="data-port-watch")

    async def _watch_calls(self, workers: Callable[[], Iterable[WorkerHandle]]) -> None:
        while True:
            await asyncio.sleep(_WATCH_SECONDS)
            now = time.monotonic_ns()
            for worker in workers():
                if worker.alive:
                    self._check(worker, self.row(worker.index), now)

    def _check(self, worker: WorkerHandle, row: Row, now: int) -> None:
        if not row.running_since_ns:
            return
        running = self.running_call(worker.index)
        call = running.call if running is not None else "a call on its data port"
        if row.call_id and running is not None and not running.call.startswith("call "):
            call = f"{call} (call {row.call_id})"
        if self._max_call_seconds and now - row.running_since_ns > self._max_call_seconds * 1e9:
            why = f"was killed: a call on its data port ran over pool.max_call_seconds ({self._max_call_seconds:g}s)"
            hung = f"it ran past pool.max_call_seconds ({self._max_call_seconds:g}s)"
            worker.kill_hung(call, hung, why, "call_timeout", caused_by_call=True)
        elif row.deadline_ns and now - row.deadline_ns > self._grace * 1e9:
            why = f"was killed: a call on its data port ran {self._grace:g}s past its caller's deadline"
            hung = f"its caller's deadline passed {(now - row.deadline_ns) / 1e9:.1f}s ago"
            worker.kill_hung(call, hung, why, "abandoned_call", caused_by_call=False)

    async def close(self, workers: Iterable[WorkerHandle], grace: float) -> None:
        """Stop every data port taking calls; calls in flight get grace seconds (a drain)."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

        async def close_one(worker: WorkerHandle) -> None:
            try:
                await asyncio.wait_for(worker.request(protocol.CloseDataPort(grace), []), grace + 5)
            except (DeploydError, TimeoutError) as error:
                log.warning("worker %d: closing its data port: %s", worker.index, error)

        await asyncio.gather(*(close_one(worker) for worker in workers if worker.alive))

    def unlink(self) -> None:
        self.board.unlink()


def _host_for_address(host: str) -> str:
    """An IPv6 literal goes in brackets in host:port."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
