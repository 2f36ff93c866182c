"""The supervisor: keeps one worker process in each of `size` slots, and does nothing else.

    start() ──> spawn_worker(slot) for every slot
    spawn_worker(slot): WorkerHandle.spawn(target) ──> prepare(worker) under `changes`
        ──> state idle ──> WorkerServing(worker) ──> listeners (the dispatcher routes calls to it)
    the process ends (sentinel) ──> on_worker_exit ──> WorkerExited(worker) ──> listeners
        ──> restart_worker(slot): after a backoff, spawn_worker(slot) again, until one serves
    watches, every few tenths of a second: a live worker over `memory_limit` is killed
    stop(reason) ──> every worker asked to exit (channel closed), then terminated, then killed

Invariants:
- A worker serves only after `prepare` (the service's replay of everything loaded) has run
  on it, and WorkerServing is emitted while `changes` is held: a load that broadcasts under
  the same lock can never miss the worker nor reach it twice.
- A worker that dies is replaced after a backoff that grows while replacements keep dying
  (0.1 s, 0.2 s, ... 10 s), so a poisoned slot cannot spin the CPU; one slot has at most one
  replacement under way. A slot whose replacement keeps failing shows "restarting" in
  status(), with why the last attempt failed.
- Over `memory_limit` bytes of anonymous memory, a worker is killed (and so replaced).

It knows nothing of calls: which worker runs what is the dispatcher's (server.pool.dispatcher),
which learns of workers from this module's events (server.pool.events). Imports no grpc.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.errors import DeploydError, WorkerCrashed
from server.ipc.cancel_board import CancelBoard
from server.pool.events import WorkerEvent, WorkerExited, WorkerListener, WorkerServing
from server.pool.gpustats import GpuStats, GpuUsage
from server.pool.procinfo import MemoryUsage, anonymous_resident_bytes, memory_usage
from server.pool.worker_handle import CallTiming, WorkerHandle, WorkerState, WorkerTarget
from server.worker.entry import WorkerSettings, run_worker

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
    state: WorkerState
    calls_served: int
    restarts: int
    memory: MemoryUsage
    last_failure: str = ""  # why the slot's last replacement failed, while it has no worker
    gpu: int = -1  # the GPU it is bound to (pool.gpus); -1: none
    gpu_memory_bytes: int | None = None  # its memory on that GPU (NVML; None: unknown)
    gpu_utilization_percent: float | None = None  # that GPU's utilisation (NVML; None: unknown)


@dataclass
class _Slot:
    """One place for a worker; what the supervisor remembers of it across replacements."""

    index: int
    worker: WorkerHandle | None = None  # the current worker, or the dead one being replaced
    serving: bool = False  # the current worker was prepared and has not ended
    restarts: int = 0  # replacements started
    backoff: float = 0.0  # seconds before the next replacement
    started_at: float = 0.0  # monotonic time its current worker was spawned
    last_failure: str = ""  # why its last replacement failed, until one serves
    replacing: asyncio.Task[None] | None = None  # restart_worker, while it runs


class Supervisor:
    def __init__(
        self,
        size: int,
        settings: WorkerSettings,
        start_timeout: float,
        stop_timeout: float,
        prepare: Callable[[WorkerHandle], Awaitable[None]],
        memory_limit: int = 0,
        target: WorkerTarget = run_worker,
        on_call_timing: Callable[[CallTiming], None] = lambda timing: None,
        cancel_board: CancelBoard | None = None,
        on_output_dropped: Callable[[int], None] = lambda size: None,
        gpu_stats: GpuStats | None = None,
    ) -> None:
        """prepare: replays everything loaded into a new worker (awaited under `changes`).
        target: what a worker process runs (server.worker.entry.run_worker).
        on_call_timing: where each request's timing goes (the daemon's metrics).
        cancel_board: where each worker learns that its call's caller gave up (one word per
        slot; the daemon owns it);
        on_output_dropped: bytes of a worker's output the log could not take (the daemon's metrics);
        gpu_stats: where the GPU workers' GPU memory and utilisation are read (NVML)."""
        self._gpu_stats = gpu_stats
        self.size = size
        # Held while a worker is prepared and starts serving, and by the service while it
        # changes what every worker holds.
        self.changes = asyncio.Lock()
        self._settings = settings
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._prepare = prepare
        self._memory_limit = memory_limit
        self._target = target
        self._on_call_timing = on_call_timing
        self._cancel_board = cancel_board
        self._on_output_dropped = on_output_dropped
        # Workers come from a fork server: a fresh interpreter that imports torch once
        # and never runs grpc, so forking from it is safe and fast.
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["server.worker.preload"])
        self._spawn_lock = asyncio.Lock()
        self._slots = [_Slot(index) for index in range(size)]
        self._listeners: list[WorkerListener] = []
        self._watches: list[asyncio.Task[None]] = []
        self._closing = False
        self._stop_reason = ""  # stop()'s, once stopping
        self._memory_cache: dict[int, tuple[float, MemoryUsage]] = {}

    @property
    def context(self) -> multiprocessing.context.BaseContext:
        """The fork server's context, for other processes that must start as workers do (keepers)."""
        return self._context

    def subscribe(self, listener: WorkerListener) -> None:
        """Have listener(event) called with every later event, after the listeners before it."""
        self._listeners.append(listener)

    def _emit(self, event: WorkerEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # one listener's bug must not stop supervision nor the others
                log.exception("a listener failed on %s", type(event).__name__)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every worker; fails (stopping what started) if any cannot start."""
        try:
            for slot in self._slots:
                worker = await self.spawn_worker(slot.index)
                self._check_memory_limit_fits(worker)
        except BaseException:
            await self.stop("the daemon could not start")
            raise
        if self._memory_limit:
            self._watch("memory", _MEMORY_CHECK_SECONDS, self._check_memory)

    async def stop(self, reason: str = "the daemon is stopping") -> None:
        """Stop every worker: close its channel, then terminate, then kill. No replacements
        start from now on."""
        self._closing = True
        self._stop_reason = reason
        for watch in self._watches:
            watch.cancel()
        replacing = [slot.replacing for slot in self._slots if slot.replacing is not None]
        for task in replacing:
            task.cancel()
        await asyncio.gather(*replacing, return_exceptions=True)
        workers = [slot.worker for slot in self._slots if slot.worker is not None]
        await asyncio.gather(*(worker.stop(self._stop_timeout, reason) for worker in workers))

    async def spawn_worker(self, index: int) -> WorkerHandle:
        """Start a worker in a slot, prepare it and have it serve (WorkerServing); if it cannot
        serve, it is stopped and the error raised."""
        slot = self._slots[index]
        board = self._cancel_board
        settings = self._settings._replace(slot=index, cancel_board=board.name if board is not None else "")
        async with self._spawn_lock:
            worker = await WorkerHandle.spawn(
                index,
                self._context,
                settings,
                self._start_timeout,
                self.on_worker_exit,
                self._target,
                self._on_output_dropped,
            )
        worker.on_timing = self._on_call_timing
        worker.cancel_board = board
        slot.worker = worker
        slot.started_at = time.monotonic()
        try:
            async with self.changes:
                await self._prepare(worker)
                if not worker.alive or self._closing:
                    raise WorkerCrashed(f"worker {index} {worker.exit_reason or 'stopped'} while being prepared")
                slot.serving = True
                worker.state = WorkerState.IDLE
                log.info("worker %d ready (pid %d)", index, worker.pid)
                self._emit(WorkerServing(worker))
        except BaseException:
            await worker.stop(self._stop_timeout, self._stop_reason or "preparing it failed")
            raise
        return worker

    def on_worker_exit(self, worker: WorkerHandle) -> None:
        """A worker's process ended (its handle says so at once): tell the listeners, and
        replace it unless it was stopped on purpose."""
        slot = self._slots[worker.index]
        if slot.worker is worker:
            slot.serving = False
        stopped = worker.stopping or self._closing
        self._emit(WorkerExited(worker, worker.exit_reason, worker.exit_cause, stopped))
        if stopped:
            return
        log.warning("worker %d (pid %d) %s; replacing it", worker.index, worker.pid, worker.exit_reason)
        if slot.replacing is not None and not slot.replacing.done():
            return  # it died while being prepared: the replacement under way tries again
        slot.replacing = asyncio.create_task(self.restart_worker(worker.index), name=f"worker-{worker.index}-restart")

    async def restart_worker(self, index: int) -> None:
        """Spawn workers in a slot, waiting longer after each that fails, until one serves."""
        slot = self._slots[index]
        if time.monotonic() - slot.started_at > _HEALTHY_AFTER_SECONDS:
            slot.backoff = 0.0
        while not self._closing:
            delay = slot.backoff
            slot.backoff = min(max(delay * 2, _BACKOFF_STEP_SECONDS), _BACKOFF_MAX_SECONDS)
            await asyncio.sleep(delay)
            if self._closing:
                return
            slot.restarts += 1
            try:
                await self.spawn_worker(index)
            except Exception as error:  # whatever it was, the slot must not stay empty
                slot.last_failure = f"{type(error).__name__}: {error}"
                # The capacity health reports (NOT_SERVING below full), and why, in one line.
                log.error(
                    "could not replace worker %d (retrying in %.1fs; %d of %d workers serve): %s",
                    index,
                    slot.backoff,
                    self.serving_count,
                    self.size,
                    slot.last_failure,
                    exc_info=not isinstance(error, DeploydError),  # a domain error's message says it all
                )
                continue
            slot.last_failure = ""
            return

    # ------------------------------------------------------------------ watches

    def _watch(self, name: str, interval: float, check: Callable[[WorkerHandle], None]) -> None:
        """Every interval seconds, check(worker) on each live worker (until stop)."""

        async def watch() -> None:
            while True:
                await asyncio.sleep(interval)
                for worker in self._live_workers():
                    try:
                        check(worker)
                    except Exception:
                        log.exception("the %s watch failed on worker %d", name, worker.index)

        self._watches.append(asyncio.create_task(watch(), name=f"worker-{name}-watch"))

    def _live_workers(self) -> list[WorkerHandle]:
        return [slot.worker for slot in self._slots if slot.worker is not None and slot.worker.alive]

    def workers(self) -> list[WorkerHandle]:
        """Every live worker, by slot (those being prepared too)."""
        return self._live_workers()

    def _check_memory(self, worker: WorkerHandle) -> None:
        used = anonymous_resident_bytes(worker.pid)
        if used > self._memory_limit:
            why = f"used {_mib(used)} of memory, over worker.memory_limit_bytes ({_mib(self._memory_limit)})"
            worker.kill(f"was killed because it {why}", "memory_limit", caused_by_call=True)

    def _check_memory_limit_fits(self, worker: WorkerHandle) -> None:
        used = anonymous_resident_bytes(worker.pid)
        if self._memory_limit and used >= self._memory_limit:
            raise WorkerCrashed(
                f"worker.memory_limit_bytes ({self._memory_limit}) is below what a fresh worker"
                f" already uses ({used}): every worker would be killed at once"
            )

    # ------------------------------------------------------------------ inspection

    @property
    def serving_count(self) -> int:
        """Slots whose worker serves."""
        return sum(slot.serving for slot in self._slots)

    @property
    def full_capacity(self) -> bool:
        """Whether every slot has a serving worker."""
        return self.serving_count == self.size

    def status(self) -> list[WorkerStatus]:
        """Every slot: its worker, or the dead one it is replacing ("restarting") and why that failed."""
        return [
            WorkerStatus(
                slot.index,
                worker.pid,
                worker.state if worker.alive or self._closing else WorkerState.RESTARTING,
                worker.calls_served,
                slot.restarts,
                self._memory(worker.pid),
                slot.last_failure,
                self.gpu_of(slot.index),
                *(self.gpu_usage_of(worker.pid, slot.index) or (None, None)),
            )
            for slot in self._slots
            if (worker := slot.worker) is not None
        ]

    def gpu_usage_of(self, pid: int, index: int) -> GpuUsage | None:
        """A worker's GPU memory and its GPU's utilisation; None: no GPU, or NVML cannot tell."""
        gpu = self.gpu_of(index)
        if gpu < 0 or self._gpu_stats is None:
            return None
        return self._gpu_stats.usage(pid, gpu)

    def gpu_usage(self) -> list[tuple[int, int, GpuUsage]]:
        """(slot, GPU, usage) of each live worker bound to a GPU that NVML can read."""
        found = []
        for worker in self._live_workers():
            usage = self.gpu_usage_of(worker.pid, worker.index)
            if usage is not None:
                found.append((worker.index, self.gpu_of(worker.index), usage))
        return found

    def gpu_of(self, index: int) -> int:
        """The GPU a slot's workers are bound to (WorkerSettings.slot_gpus); -1: none."""
        gpus = self._settings.slot_gpus
        return gpus[index] if index < len(gpus) else -1

    def memory(self) -> list[tuple[int, MemoryUsage]]:
        """Each live worker's slot and memory (read at most once a second per worker)."""
        return [(worker.index, self._memory(worker.pid)) for worker in self._live_workers()]

    def _memory(self, pid: int) -> MemoryUsage:
        """A worker's memory, read at most once a second: smaps_rollup walks every mapping
        (milliseconds for a process with torch loaded), and Status may be polled often."""
        now = time.monotonic()
        cached = self._memory_cache.get(pid)
        if cached is None or now - cached[0] > _MEMORY_CACHE_SECONDS:
            cached = self._memory_cache[pid] = (now, memory_usage(pid))
            current = {slot.worker.pid for slot in self._slots if slot.worker is not None}
            for gone in set(self._memory_cache) - current:
                del self._memory_cache[gone]
        return cached[1]
