"""The dispatcher: routes the daemon's calls to free workers.

    call(request) ──> a free worker, or the line for the next one set free ──> reply
    call(request, slots) ──> the same, among those slots only (a placed model: server.models.placement)
    call_on(slot, pid, request) ──> that worker, once it is free (a session's step) ──> reply
    broadcast(request) ──> every serving worker (all replies gathered)

    supervisor events ──> on_worker_event:
        WorkerServing(worker) ──> it joins the free workers
        WorkerExited(worker)  ──> it leaves them; steps waiting for it fail (WorkerCrashed)

A worker that a call lets go goes, in this order, to the first session step waiting for that
worker, to the first call waiting that may use it (any worker, or one of a set of slots that holds it),
or to the free workers (and the release
listeners, batchers waiting for a free worker, are told).

Invariants:
- A worker takes calls only between its WorkerServing and its WorkerExited; the supervisor
  emits both, so this module never spawns, replaces nor stops a worker.
- At most `max_queued_calls` calls wait for a worker; the next fails at once (Overloaded).
- A worker whose caller gave up is told so (the cancel board: model code that asks,
  deployd_worker.cancelled(), stops early) and takes no other call; if it does not answer
  within `abandoned_call_grace` seconds it is killed (and so replaced): a hung model cannot
  keep capacity. A call running past `max_call_seconds` kills its worker too. Either way the
  worker's Python stacks go to the log first, under a line naming the worker and the call
  (WorkerHandle.kill_hung).

Imports no grpc: the servicer above it translates.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Collection
from typing import Any

from server import tracing
from server.errors import Overloaded, PoolClosed, WorkerCrashed
from server.ipc import protocol
from server.pool.events import WorkerEvent, WorkerExited, WorkerServing
from server.pool.worker_handle import WorkerHandle, WorkerState, describe_request, interpret_reply

# The worker slots a call may go to; None: any (the fast path, a model on every worker).
Slots = Collection[int] | None


class Dispatcher:
    def __init__(
        self,
        max_queued_calls: int = 1000,
        abandoned_call_grace: float = 5.0,
        max_call_seconds: float = 0.0,
        on_queue_wait: Callable[[float], None] = lambda seconds: None,
        on_run: Callable[[str, float], None] = lambda object_id, seconds: None,
    ) -> None:
        """on_queue_wait: seconds each call waited for its worker; on_run: seconds each Invoke
        ran, by object id (the daemon's metrics)."""
        self._max_queued_calls = max_queued_calls
        self._abandoned_call_grace = abandoned_call_grace
        self._max_call_seconds = max_call_seconds
        self._on_queue_wait = on_queue_wait
        self._on_run = on_run
        self._serving: dict[int, WorkerHandle] = {}  # slot -> its serving worker
        self._free_workers: dict[WorkerHandle, None] = {}  # serving and idle, longest idle first
        # Calls waiting for a worker, first come first served, each with the slots it may use
        # (None: any): a worker set free is handed to the first that may use it (it stays busy),
        # so a call for a placed model never holds up calls for others.
        self._waiters: collections.deque[tuple[asyncio.Future[WorkerHandle], Slots]] = collections.deque()
        # Steps (call_on) waiting for a particular busy worker: a worker set free goes to them
        # before anyone else.
        self._pinned: dict[WorkerHandle, list[asyncio.Future[None]]] = {}
        self._waiting = 0  # calls and steps waiting for a worker
        self._closing = False
        # Called whenever a worker is set free (a call ended, or a worker began serving):
        # batchers waiting for one (server.batching).
        self.release_listeners: set[Callable[[], None]] = set()

    # ------------------------------------------------------------------ events

    def on_worker_event(self, event: WorkerEvent) -> None:
        """The supervisor's events (subscribe this): who serves."""
        worker = event.worker
        if isinstance(event, WorkerServing):
            self._serving[worker.index] = worker
            self._free(worker)
        elif isinstance(event, WorkerExited):
            if self._serving.get(worker.index) is worker:
                del self._serving[worker.index]
            self._free_workers.pop(worker, None)
            for waiter in self._pinned.pop(worker, []):
                if not waiter.done():
                    waiter.set_exception(WorkerCrashed(f"worker {worker.index} {event.reason}", started=False))

    def close(self) -> None:
        """Take no more calls (PoolClosed); calls waiting for a worker fail so too."""
        self._closing = True
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosed())

    # ------------------------------------------------------------------ routing

    async def call(
        self,
        message: protocol.Request,
        buffers: list[Any],
        on_start: Callable[[], None] | None = None,
        slots: Slots = None,
    ) -> tuple[Any, list[Any]]:
        """Run a request on one free worker (of `slots`, if given), waiting in line for one if
        all are busy; on_start is called once it has its worker."""
        if self._waiting >= self._max_queued_calls and self._first_free(slots) is None:
            raise Overloaded(
                f"all workers are busy and {self._waiting} calls already wait for one"
                f" (pool.max_queued_calls={self._max_queued_calls}); try again later"
            )
        queued_at = time.perf_counter()
        self._waiting += 1
        try:
            worker = await self._acquire(slots)
        finally:
            self._waiting -= 1
        return await self._run_on(worker, message, buffers, queued_at, on_start)

    async def call_on(
        self, index: int, pid: int, message: protocol.Request, buffers: list[Any]
    ) -> tuple[Any, list[Any]]:
        """Run a request on the worker in slot `index`, if it is still the one with `pid`,
        waiting while it is busy. Other calls keep using it meanwhile: this holds it for one
        request, not for a sequence of them."""
        worker = self._serving.get(index)
        if worker is None or worker.pid != pid:
            raise WorkerCrashed(f"worker {index} (pid {pid}) is gone", started=False)
        queued_at = time.perf_counter()
        if worker in self._free_workers:
            del self._free_workers[worker]
            worker.state = WorkerState.BUSY
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._pinned.setdefault(worker, []).append(waiter)
            self._waiting += 1
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._free(worker)  # handed over just as its caller gave up: pass it on
                raise
            finally:
                self._waiting -= 1
                waiters = self._pinned.get(worker)
                if waiters is not None and waiter in waiters:
                    waiters.remove(waiter)
                    if not waiters:
                        del self._pinned[worker]
        return await self._run_on(worker, message, buffers, queued_at, None)

    async def _acquire(self, slots: Slots) -> WorkerHandle:
        """A free worker (of `slots`), now busy: the one free the longest, or the first set free."""
        ahead = False  # back in line because the worker handed over had exited: at its head
        while True:
            if self._closing:
                raise PoolClosed()
            worker = self._first_free(slots)
            if worker is not None:
                del self._free_workers[worker]
                worker.state = WorkerState.BUSY
                return worker
            waiter: asyncio.Future[WorkerHandle] = asyncio.get_running_loop().create_future()
            if ahead:
                self._waiters.appendleft((waiter, slots))
            else:
                self._waiters.append((waiter, slots))
            try:
                worker = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._free(waiter.result())  # handed over just as its caller gave up: pass it on
                else:
                    self._leave_line(waiter)
                raise
            if self._serving.get(worker.index) is worker:
                return worker
            ahead = True

    def _first_free(self, slots: Slots) -> WorkerHandle | None:
        """The free worker (of `slots`) free the longest, if any."""
        if slots is None:
            return next(iter(self._free_workers), None)
        return next((worker for worker in self._free_workers if worker.index in slots), None)

    def _leave_line(self, waiter: asyncio.Future[WorkerHandle]) -> None:
        for position, (waiting, _) in enumerate(self._waiters):
            if waiting is waiter:
                del self._waiters[position]
                return

    def _hand_to_waiter(self, worker: WorkerHandle) -> bool:
        """Give a worker set free to the first call in line that may use it; whether one took it."""
        position = 0
        while position < len(self._waiters):
            waiter, slots = self._waiters[position]
            if waiter.done():
                del self._waiters[position]
            elif slots is None or worker.index in slots:
                del self._waiters[position]
                worker.state = WorkerState.BUSY
                waiter.set_result(worker)
                return True
            else:
                position += 1
        return False

    async def _run_on(
        self,
        worker: WorkerHandle,
        message: protocol.Request,
        buffers: list[Any],
        queued_at: float,
        on_start: Callable[[], None] | None,
    ) -> tuple[Any, list[Any]]:
        """Run a request on a worker this call holds (state busy), then let it go. With tracing
        on, the wait and the trip to the worker are spans under the caller's."""
        running_since = time.perf_counter()
        self._on_queue_wait(running_since - queued_at)
        tracing.record_queue(queued_at, running_since, worker.index, worker.pid)
        if on_start is not None:
            on_start()
        try:
            reply = worker.send(message, buffers)
        except BaseException:
            self._release(worker)
            raise
        try:
            frame = await self._await_reply(worker, reply, message)
        except asyncio.CancelledError:
            # The worker still runs the call: it takes no other until it answers or dies,
            # and it is killed if it has not answered within the grace.
            reply.add_done_callback(lambda _: self._release(worker))
            worker.abandon(reply, self._abandoned_call_grace, describe_request(message))
            raise
        except BaseException:
            self._release(worker)
            if tracing.enabled():
                tracing.record_worker_call(
                    running_since, None, time.perf_counter(), worker.index, worker.pid, _object_of(message), False
                )
            raise
        self._release(worker)
        if tracing.enabled():
            ok = not isinstance(frame.message, protocol.Failure)
            times = frame.notes.get("times")
            tracing.record_worker_call(
                running_since, times, time.perf_counter(), worker.index, worker.pid, _object_of(message), ok
            )
        if isinstance(message, protocol.Invoke):
            self._on_run(message.object_id, time.perf_counter() - running_since)
        return interpret_reply(frame)

    async def _await_reply(
        self, worker: WorkerHandle, reply: asyncio.Future[protocol.Frame], message: protocol.Request
    ) -> protocol.Frame:
        """The reply; past max_call_seconds the worker is killed and the call fails with WorkerCrashed."""
        if not self._max_call_seconds:
            return await asyncio.shield(reply)
        try:
            return await asyncio.wait_for(asyncio.shield(reply), self._max_call_seconds)
        except TimeoutError:
            why = f"was killed: the call ran over pool.max_call_seconds ({self._max_call_seconds:g}s)"
            hung = f"it ran past pool.max_call_seconds ({self._max_call_seconds:g}s)"
            worker.kill_hung(describe_request(message), hung, why, "call_timeout", caused_by_call=True)
            return await asyncio.shield(reply)

    def _release(self, worker: WorkerHandle) -> None:
        worker.calls_served += 1
        self._free(worker)

    def _free(self, worker: WorkerHandle) -> None:
        """A worker no call holds any more: to the first step waiting for it, else to the
        first call waiting that may use it, else to the free workers."""
        if self._serving.get(worker.index) is not worker:
            return  # it has exited
        for waiter in self._pinned.get(worker, []):
            if not waiter.done():
                worker.state = WorkerState.BUSY
                waiter.set_result(None)  # it goes straight to that step
                return
        if not self._hand_to_waiter(worker):
            worker.state = WorkerState.IDLE
            self._free_workers[worker] = None
        for listener in list(self.release_listeners):
            listener()

    async def broadcast(
        self, message: protocol.Request, buffers: list[Any], slots: Slots = None
    ) -> list[tuple[WorkerHandle, Any]]:
        """Send a request to every serving worker (of `slots`); returns (worker, result or
        exception) pairs.

        Callers that change what workers hold must hold the supervisor's `changes`.
        """
        workers = [self._serving[index] for index in sorted(self._serving) if slots is None or index in slots]
        replies = [self._send_or_fail(worker, message, buffers) for worker in workers]
        try:
            frames = await asyncio.gather(*(asyncio.shield(reply) for reply in replies), return_exceptions=True)
        except asyncio.CancelledError:
            for worker, reply in zip(workers, replies, strict=True):
                worker.abandon(reply, self._abandoned_call_grace, describe_request(message))
            raise
        outcomes: list[Any] = []
        for frame in frames:
            try:
                outcomes.append(frame if isinstance(frame, BaseException) else interpret_reply(frame))
            except Exception as error:  # a Failure's domain error, or a malformed reply
                outcomes.append(error)
        return list(zip(workers, outcomes, strict=True))

    @staticmethod
    def _send_or_fail(worker: WorkerHandle, message: protocol.Request, buffers: list[Any]) -> asyncio.Future[Any]:
        try:
            return worker.send(message, buffers)
        except WorkerCrashed as error:  # it died before this request reached it
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(WorkerCrashed(str(error), started=False))
            return failed

    # ------------------------------------------------------------------ inspection

    def serving_workers(self) -> list[tuple[int, int, WorkerState]]:
        """(slot, pid, state) of every serving worker."""
        return [(index, worker.pid, worker.state) for index, worker in sorted(self._serving.items())]

    @property
    def serving_count(self) -> int:
        """Workers calls can be routed to."""
        return len(self._serving)

    def serving_in(self, slots: Slots) -> int:
        """Serving workers among `slots` (None: every one)."""
        return len(self._serving) if slots is None else sum(1 for index in self._serving if index in slots)

    def idle_count(self, slots: Slots = None) -> int:
        """Serving workers (of `slots`) that no call holds."""
        if slots is None:
            return len(self._free_workers)
        return sum(1 for worker in self._free_workers if worker.index in slots)

    @property
    def busy_count(self) -> int:
        return sum(1 for worker in self._serving.values() if worker.state is WorkerState.BUSY)

    @property
    def max_queued_calls(self) -> int:
        return self._max_queued_calls

    @property
    def queue_depth(self) -> int:
        """Calls waiting for a free worker."""
        return self._waiting


def _object_of(message: protocol.Request) -> str:
    object_id = getattr(message, "object_id", "")
    return object_id if isinstance(object_id, str) else ""
