"""The worker pool: starts N workers, replaces the ones that die, routes calls to free ones.

    call(request) ──> idle queue ──> one free worker ──> reply
    call_on(slot, request) ──> that worker, once it is free (a session's calls) ──> reply
    broadcast(request) ──> every serving worker (all replies gathered)

Invariants:
- A worker takes calls only after `prepare` (the service's replay of everything loaded)
  has run on it, and it is added to the serving set while `changes` is held, so a load
  that broadcasts under the same lock can never miss it nor reach it twice.
- A dead worker's calls fail with WorkerCrashed (UNAVAILABLE); it is replaced after a
  backoff that grows while replacements keep dying.
- At most `max_queued_calls` calls wait for a worker; the next fails at once (Overloaded).
- A worker whose caller gave up takes no other call; if it does not answer within
  `abandoned_call_grace` seconds it is killed (and so replaced): a hung model cannot
  keep capacity. Over `memory_limit` bytes of anonymous memory, a worker is killed too.

Imports no grpc: the servicer above it translates.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from server.errors import DeploydError, Overloaded, PoolClosed, WorkerCrashed
from server.ipc import protocol
from server.pool.procinfo import MemoryUsage, anonymous_resident_bytes, memory_usage
from server.pool.worker_handle import CallTiming, WorkerHandle, interpret_reply
from server.worker.entry import WorkerSettings

log = logging.getLogger(__name__)

# A worker that dies is replaced at once; if its replacements keep dying, after
# 0.1 s, 0.2 s, ... up to 10 s, so a poisoned slot cannot spin the CPU.
_BACKOFF_STEP_SECONDS = 0.1
_BACKOFF_MAX_SECONDS = 10.0
# A worker that served this long resets its slot's backoff.
_HEALTHY_AFTER_SECONDS = 30.0
_MEMORY_CACHE_SECONDS = 1.0
# How often workers' memory is checked against the limit. A model filling fresh memory at
# ~2-3 GB/s (this machine) can overshoot the limit by a few hundred MB before it is seen.
_MEMORY_CHECK_SECONDS = 0.1


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


@dataclass(frozen=True)
class WorkerStatus:
    index: int
    pid: int
    state: str
    calls_served: int
    restarts: int
    memory: MemoryUsage
    last_failure: str = ""  # why the slot's last replacement failed, while it has no worker


class WorkerPool:
    def __init__(
        self,
        size: int,
        settings: WorkerSettings,
        start_timeout: float,
        stop_timeout: float,
        prepare: Callable[[WorkerHandle], Awaitable[None]],
        max_queued_calls: int = 1000,
        abandoned_call_grace: float = 5.0,
        max_call_seconds: float = 0.0,
        memory_limit: int = 0,
        on_serving_changed: Callable[[int], None] = lambda count: None,
        on_call_timing: Callable[[CallTiming], None] = lambda timing: None,
        on_queue_wait: Callable[[float], None] = lambda seconds: None,
        on_run: Callable[[str, float], None] = lambda object_id, seconds: None,
        on_restart: Callable[[str], None] = lambda cause: None,
    ) -> None:
        self.size = size
        # Held while the set of serving workers changes, and by the service while it
        # changes what every worker holds.
        self.changes = asyncio.Lock()
        self._settings = settings
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._prepare = prepare
        self._max_queued_calls = max_queued_calls
        self._abandoned_call_grace = abandoned_call_grace
        self._max_call_seconds = max_call_seconds
        self._memory_limit = memory_limit
        self._waiting = 0  # calls waiting for a free worker
        self._memory_watch: asyncio.Task[None] | None = None
        self._on_serving_changed = on_serving_changed
        self._on_call_timing = on_call_timing
        self._on_queue_wait = on_queue_wait
        self._on_run = on_run
        self._on_restart = on_restart
        # Workers come from a fork server: a fresh interpreter that imports torch once
        # and never runs grpc, so forking from it is safe and fast.
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["server.worker.preload"])
        self._spawn_lock = asyncio.Lock()
        self._workers: dict[int, WorkerHandle] = {}  # slot index -> current worker
        self._serving: set[WorkerHandle] = set()
        self._idle: asyncio.Queue[WorkerHandle] = asyncio.Queue()
        # Workers with an entry in _idle. call_on takes an idle worker without taking its entry
        # out (a Queue cannot): when it is freed the entry is still there, and must not be doubled.
        self._queued: set[WorkerHandle] = set()
        self._restarts = dict.fromkeys(range(size), 0)
        self._backoff = dict.fromkeys(range(size), 0.0)
        self._started_at: dict[int, float] = {}
        self._restart_tasks: set[asyncio.Task[None]] = set()
        self._last_failure: dict[int, str] = {}  # slot -> why its last replacement failed
        self._closing = False
        self._memory_cache: dict[int, tuple[float, MemoryUsage]] = {}
        # Called whenever a worker is free for calls (a call ended, or a worker began serving):
        # batchers waiting for one (server.batching).
        self.release_listeners: set[Callable[[], None]] = set()
        # Called with the slot and pid of a worker that died or stopped: sessions held on it end.
        self.exit_listeners: set[Callable[[int, int], None]] = set()
        # Callers of call_on waiting for a particular busy worker, first come first served: a
        # worker that finishes a call goes to them before it returns to the idle queue.
        self._pinned: dict[WorkerHandle, list[asyncio.Future[None]]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every worker; fails (stopping what started) if any cannot start."""
        try:
            for index in range(self.size):
                worker = await self.spawn_worker(index)
                self._check_memory_limit_fits(worker)
        except BaseException:
            await self.stop()
            raise
        if self._memory_limit:
            self._memory_watch = asyncio.create_task(self._watch_memory(), name="worker-memory-watch")

    def _check_memory_limit_fits(self, worker: WorkerHandle) -> None:
        used = anonymous_resident_bytes(worker.pid)
        if self._memory_limit and used >= self._memory_limit:
            raise WorkerCrashed(
                f"worker.memory_limit_bytes ({self._memory_limit}) is below what a fresh worker"
                f" already uses ({used}): every worker would be killed at once"
            )

    async def _watch_memory(self) -> None:
        while True:
            await asyncio.sleep(_MEMORY_CHECK_SECONDS)
            for worker in list(self._workers.values()):
                used = anonymous_resident_bytes(worker.pid) if worker.alive else 0
                if used > self._memory_limit:
                    why = f"used {_mib(used)} of memory, over worker.memory_limit_bytes ({_mib(self._memory_limit)})"
                    worker.kill(f"was killed because it {why}", "memory_limit", caused_by_call=True)

    async def spawn_worker(self, index: int) -> WorkerHandle:
        async with self._spawn_lock:
            worker = await WorkerHandle.spawn(
                index, self._context, self._settings, self._start_timeout, self.on_worker_exit
            )
        worker.on_timing = self._on_call_timing
        self._workers[index] = worker
        self._started_at[index] = time.monotonic()
        try:
            async with self.changes:
                await self._prepare(worker)
                if not worker.alive or self._closing:
                    raise WorkerCrashed(f"worker {index} {worker.exit_reason or 'stopped'} while being prepared")
                self._serving.add(worker)
                worker.state = "idle"
                self._queued.add(worker)
                self._idle.put_nowait(worker)
        except BaseException:
            await worker.stop(self._stop_timeout)
            raise
        log.info("worker %d ready (pid %d)", index, worker.pid)
        self._on_serving_changed(len(self._serving))
        for listener in list(self.release_listeners):
            listener()
        return worker

    def on_worker_exit(self, worker: WorkerHandle) -> None:
        self._serving.discard(worker)
        for waiter in self._pinned.pop(worker, []):
            if not waiter.done():
                waiter.set_exception(WorkerCrashed(f"worker {worker.index} {worker.exit_reason}", started=False))
        for listener in list(self.exit_listeners):
            listener(worker.index, worker.pid)
        if worker.stopping or self._closing:
            return
        log.warning("worker %d (pid %d) %s; replacing it", worker.index, worker.pid, worker.exit_reason)
        self._on_restart(worker.exit_cause)
        self._on_serving_changed(len(self._serving))
        task = asyncio.create_task(self.restart_worker(worker.index))
        self._restart_tasks.add(task)
        task.add_done_callback(self._restart_tasks.discard)

    async def restart_worker(self, index: int) -> None:
        if time.monotonic() - self._started_at.get(index, 0.0) > _HEALTHY_AFTER_SECONDS:
            self._backoff[index] = 0.0
        while not self._closing:
            delay = self._backoff[index]
            self._backoff[index] = min(max(delay * 2, _BACKOFF_STEP_SECONDS), _BACKOFF_MAX_SECONDS)
            await asyncio.sleep(delay)
            if self._closing:
                return
            self._restarts[index] += 1
            try:
                await self.spawn_worker(index)
            except Exception as error:  # whatever it was, the slot must not stay empty
                self._last_failure[index] = f"{type(error).__name__}: {error}"
                log.error(
                    "could not replace worker %d (retrying in %.1fs): %s",
                    index,
                    self._backoff[index],
                    self._last_failure[index],
                    exc_info=not isinstance(error, DeploydError),  # a domain error's message says it all
                )
                continue
            self._last_failure.pop(index, None)
            return

    async def stop(self) -> None:
        """Stop every worker: close its channel, then terminate, then kill."""
        self._closing = True
        if self._memory_watch is not None:
            self._memory_watch.cancel()
        for task in list(self._restart_tasks):
            task.cancel()
        await asyncio.gather(*self._restart_tasks, return_exceptions=True)
        await asyncio.gather(*(worker.stop(self._stop_timeout) for worker in self._workers.values()))
        self._serving.clear()

    # ------------------------------------------------------------------ routing

    async def call(
        self, message: protocol.Request, buffers: list[Any], on_start: Callable[[], None] | None = None
    ) -> tuple[Any, list[Any]]:
        """Run a request on one free worker, waiting in line for one if all are busy; on_start
        is called once it has its worker."""
        # Not _idle.empty(): the queue may hold entries of workers a session's call took. The
        # count walks the workers: asked only once the line is full, off the common path.
        if self._waiting >= self._max_queued_calls and self.idle_count() == 0:
            raise Overloaded(
                f"all workers are busy and {self._waiting} calls already wait for one"
                f" (pool.max_queued_calls={self._max_queued_calls}); try again later"
            )
        queued_at = time.perf_counter()
        self._waiting += 1
        try:
            worker = await self._acquire()
        finally:
            self._waiting -= 1
        return await self._run_on(worker, message, buffers, queued_at, on_start)

    async def call_on(
        self, index: int, pid: int, message: protocol.Request, buffers: list[Any]
    ) -> tuple[Any, list[Any]]:
        """Run a request on the worker in slot `index`, if it is still the one with `pid`,
        waiting while it is busy. Other calls keep using it meanwhile: this holds it for one
        request, not for a sequence of them."""
        worker = self._workers.get(index)
        if worker is None or worker.pid != pid or worker not in self._serving:
            raise WorkerCrashed(f"worker {index} (pid {pid}) is gone", started=False)
        queued_at = time.perf_counter()
        if worker.state == "idle":
            worker.state = "busy"  # its entry in the idle queue is skipped (_acquire)
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
        return await self._run_on(worker, message, buffers, queued_at, None)

    async def _run_on(
        self,
        worker: WorkerHandle,
        message: protocol.Request,
        buffers: list[Any],
        queued_at: float,
        on_start: Callable[[], None] | None,
    ) -> tuple[Any, list[Any]]:
        """Run a request on a worker this call holds (state "busy"), then let it go."""
        running_since = time.perf_counter()
        self._on_queue_wait(running_since - queued_at)
        if on_start is not None:
            on_start()
        try:
            reply = worker.send(message, buffers)
        except BaseException:
            self._release(worker)
            raise
        try:
            frame = await self._await_reply(worker, reply)
        except asyncio.CancelledError:
            # The worker still runs the call: it takes no other until it answers or dies,
            # and it is killed if it has not answered within the grace.
            reply.add_done_callback(lambda _: self._release(worker))
            worker.abandon(reply, self._abandoned_call_grace)
            raise
        except BaseException:
            self._release(worker)
            raise
        self._release(worker)
        if isinstance(message, protocol.Invoke):
            self._on_run(message.object_id, time.perf_counter() - running_since)
        return interpret_reply(frame)

    async def _await_reply(self, worker: WorkerHandle, reply: asyncio.Future[protocol.Frame]) -> protocol.Frame:
        """The reply; past max_call_seconds the worker is killed and the call fails with WorkerCrashed."""
        if not self._max_call_seconds:
            return await asyncio.shield(reply)
        try:
            return await asyncio.wait_for(asyncio.shield(reply), self._max_call_seconds)
        except TimeoutError:
            why = f"was killed: the call ran over pool.max_call_seconds ({self._max_call_seconds:g}s)"
            worker.kill(why, "call_timeout", caused_by_call=True)
            return await asyncio.shield(reply)

    async def _acquire(self) -> WorkerHandle:
        while True:
            if self._closing:
                raise PoolClosed()
            worker = await self._idle.get()
            self._queued.discard(worker)
            # Skip workers that died while idle, and ones a session's call took (call_on).
            if worker in self._serving and worker.state == "idle":
                worker.state = "busy"
                return worker

    def _release(self, worker: WorkerHandle) -> None:
        worker.calls_served += 1
        self._free(worker)

    def _free(self, worker: WorkerHandle) -> None:
        """A worker no call holds any more: to the first session call waiting for it, else idle."""
        if worker not in self._serving:
            return
        for waiter in self._pinned.get(worker, []):
            if not waiter.done():
                waiter.set_result(None)  # still "busy": it goes straight to that call
                return
        worker.state = "idle"
        if worker not in self._queued:
            self._queued.add(worker)
            self._idle.put_nowait(worker)
        for listener in list(self.release_listeners):
            listener()

    def serving_workers(self) -> list[tuple[int, int, str]]:
        """(slot, pid, state) of every serving worker."""
        return sorted((worker.index, worker.pid, worker.state) for worker in self._serving)

    def idle_count(self) -> int:
        """Serving workers that no call holds."""
        return sum(1 for worker in self._serving if worker.state == "idle")

    async def broadcast(self, message: protocol.Request, buffers: list[Any]) -> list[tuple[WorkerHandle, Any]]:
        """Send a request to every serving worker; returns (worker, result or exception) pairs.

        Callers that change what workers hold must hold `changes`.
        """
        workers = sorted(self._serving, key=lambda worker: worker.index)
        replies = [self._send_or_fail(worker, message, buffers) for worker in workers]
        try:
            frames = await asyncio.gather(*(asyncio.shield(reply) for reply in replies), return_exceptions=True)
        except asyncio.CancelledError:
            for worker, reply in zip(workers, replies, strict=True):
                worker.abandon(reply, self._abandoned_call_grace)
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

    @property
    def serving_count(self) -> int:
        return len(self._serving)

    @property
    def busy_count(self) -> int:
        return sum(1 for worker in self._serving if worker.state == "busy")

    def memory(self) -> list[tuple[int, MemoryUsage]]:
        """Each live worker's slot and memory (read at most once a second per worker)."""
        return [(index, self._memory(worker.pid)) for index, worker in sorted(self._workers.items()) if worker.alive]

    @property
    def max_queued_calls(self) -> int:
        return self._max_queued_calls

    @property
    def queue_depth(self) -> int:
        """Calls waiting for a free worker."""
        return self._waiting

    def status(self) -> list[WorkerStatus]:
        """Every slot: its worker, or the dead one it is replacing ("restarting") and why that failed."""
        return [
            WorkerStatus(
                index,
                worker.pid,
                worker.state if worker.alive or self._closing else "restarting",
                worker.calls_served,
                self._restarts[index],
                self._memory(worker.pid),
                self._last_failure.get(index, ""),
            )
            for index, worker in sorted(self._workers.items())
        ]

    @property
    def full_capacity(self) -> bool:
        """Whether every slot has a serving worker."""
        return len(self._serving) == self.size

    def _memory(self, pid: int) -> MemoryUsage:
        """A worker's memory, read at most once a second: smaps_rollup walks every mapping
        (milliseconds for a process with torch loaded), and Status may be polled often."""
        now = time.monotonic()
        cached = self._memory_cache.get(pid)
        if cached is None or now - cached[0] > _MEMORY_CACHE_SECONDS:
            cached = self._memory_cache[pid] = (now, memory_usage(pid))
            for gone in set(self._memory_cache) - {worker.pid for worker in self._workers.values()}:
                del self._memory_cache[gone]
        return cached[1]
