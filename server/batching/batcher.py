"""Dynamic batching: many small calls to one model become one call on one worker.

    callers --call()--> pending (arrival order) --dispatch--> pool.call(batch) --split--> callers

A call whose arguments can join a batch (server.batching.merge) waits in `pending`; one
dispatch loop per model version (running only while calls wait) sends the oldest waiting
call together with every alike call behind it, up to `max_batch_size` rows:
- at once when the rows reach max_batch_size or one of `preferred_batch_sizes`;
- while every worker is busy, never: calls gather (they would wait for a worker anyway),
  so the busier the pool, the larger the batches;
- when a worker is free and no batch of this model is running (no load): at once, with
  whatever is waiting; a lone caller is never delayed (and goes straight to the pool from its
  own task, without the dispatch loop);
- when a worker is free and batches of this model are running (load): once the oldest call
  has waited `max_queue_delay_ms` for company, or sooner if the batch fills.

Each batch runs in a task of its own, so a caller that gives up (deadline, cancellation)
leaves it without failing the others; if every caller of a batch gives up, the batch is
cancelled like any abandoned call. A worker that dies fails every call of its batch
(UNAVAILABLE). A call that cannot join a batch goes to the pool as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from server import tracing
from server.batching.merge import Unbatchable, batch_key, merge, rows_of, split
from server.errors import InvalidArgument, Overloaded
from server.ipc import protocol
from server.pool.deadlines import caller_deadline_ns, latest

log = logging.getLogger(__name__)


class BatchPolicy(NamedTuple):
    max_batch_size: int  # rows (dim 0) of one batch
    max_queue_delay_ms: float = 2.0  # how long the first call of a batch may wait for company
    preferred_batch_sizes: tuple[int, ...] = ()  # rows at which a batch goes at once

    def checked(self) -> BatchPolicy:
        """The policy, or InvalidArgument saying what is wrong with it."""
        if not 1 <= self.max_batch_size <= MAX_BATCH_SIZE:
            raise InvalidArgument(f"batching: max_batch_size must be 1 to {MAX_BATCH_SIZE}, got {self.max_batch_size}")
        if not 0 <= self.max_queue_delay_ms <= MAX_QUEUE_DELAY_MS:
            raise InvalidArgument(
                f"batching: max_queue_delay_ms must be 0 to {MAX_QUEUE_DELAY_MS:g}, got {self.max_queue_delay_ms:g}"
            )
        wrong = [size for size in self.preferred_batch_sizes if not 1 <= size <= self.max_batch_size]
        if wrong:
            raise InvalidArgument(f"batching: preferred_batch_sizes {wrong} are not 1 to max_batch_size")
        return self


MAX_BATCH_SIZE = 65536
MAX_QUEUE_DELAY_MS = 10_000.0


def _new_future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _Waiting:
    method: str
    key: Any
    rows: int
    args: list[Any]
    kwargs: dict[str, Any]
    buffers: list[Any]
    arrived: float
    trace: Any  # the caller's span context, for its batch to link to (server.tracing); None: off
    deadline_ns: int = field(default_factory=caller_deadline_ns.get)  # its caller's (server.pool.deadlines)
    answer: asyncio.Future[tuple[Any, list[Any]]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class BatchObserver(NamedTuple):
    """Where a batcher reports (the daemon's metrics): rows per batch, seconds each call waited."""

    batch: Callable[[str, int], None]
    waited: Callable[[str, float], None]


class Pool(NamedTuple):
    """What a batcher needs of the worker pool."""

    call: Callable[..., Awaitable[tuple[Any, list[Any]]]]  # pool.call(message, buffers, on_start=)
    idle_count: Callable[[], int]
    max_queued_calls: int
    release_listeners: set[Callable[[], None]]  # called whenever a worker is set free


class Batcher:
    def __init__(self, object_id: str, label: str, policy: BatchPolicy, pool: Pool, observer: BatchObserver) -> None:
        self._object_id = object_id
        self._label = label  # the model's name, for metrics
        self._policy = policy
        self._pool = pool
        self._observer = observer
        self._pending: list[_Waiting] = []
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._unstarted = 0  # batches sent to the pool that have no worker yet
        self._batches: set[asyncio.Task[None]] = set()  # batch tasks (sent, not yet answered)
        self._running = 0  # batches and lone calls sent and not yet answered: the model's load
        pool.release_listeners.add(self._wakeup.set)

    async def call(
        self, method: str, args: list[Any], kwargs: dict[str, Any], buffers: list[Any]
    ) -> tuple[Any, list[Any]]:
        """Run a call, batched with alike calls where it can be."""
        try:
            rows = rows_of(args, kwargs)
        except Unbatchable:
            return await self._pool.call(protocol.Invoke(self._object_id, method, args, kwargs), buffers)
        if len(self._pending) >= self._pool.max_queued_calls:
            raise Overloaded(
                f"{len(self._pending)} calls already wait to be batched"
                f" (pool.max_queued_calls={self._pool.max_queued_calls}); try again later"
            )
        if not self._pending and not self._running and self._pool.idle_count() > self._unstarted:
            return await self._alone(method, args, kwargs, buffers, rows)
        key = batch_key(method, args, kwargs)
        waiting = _Waiting(method, key, rows, args, kwargs, buffers, time.perf_counter(), tracing.caller())
        self._pending.append(waiting)
        self._wakeup.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._dispatch_loop(), name=f"batcher-{self._label}")
        try:
            return await asyncio.shield(waiting.answer)
        except asyncio.CancelledError:
            if waiting in self._pending:  # not sent yet: it just leaves the line
                self._pending.remove(waiting)
            elif not waiting.answer.done():
                waiting.answer.cancel()  # sent: its batch runs on for the others
            raise

    async def _alone(
        self, method: str, args: list[Any], kwargs: dict[str, Any], buffers: list[Any], rows: int
    ) -> tuple[Any, list[Any]]:
        """No load: a worker is free and nothing waits or runs. The call goes at once, from the
        caller's own task (no dispatch loop, no batch task), as a batch of one."""
        self._observer.waited(self._label, 0.0)
        self._observer.batch(self._label, rows)
        self._running += 1
        start = self._Start(self)
        try:
            result, reply = await self._pool.call(
                protocol.Invoke(self._object_id, method, args, kwargs), buffers, on_start=start
            )
        finally:
            self._running -= 1
            start.end()
        # Checked alone too: a result that does not split fails whatever the load.
        return split(result, reply, [rows])[0]

    @property
    def policy(self) -> BatchPolicy:
        return self._policy

    @property
    def waiting(self) -> int:
        """Calls waiting for their batch to go."""
        return len(self._pending)

    @property
    def idle(self) -> bool:
        """No call waits, and no batch or lone call runs."""
        return not self._pending and not self._running

    def close(self) -> None:
        """Stop dispatching (the model is unloaded, or the daemon stops)."""
        self._pool.release_listeners.discard(self._wakeup.set)
        if self._loop_task is not None:
            self._loop_task.cancel()

    # ------------------------------------------------------------------ dispatch

    async def _dispatch_loop(self) -> None:
        while self._pending:
            oldest = self._pending[0]
            taken = self._take([waiting for waiting in self._pending if waiting.key == oldest.key])
            rows = sum(waiting.rows for waiting in taken)
            full = rows >= self._policy.max_batch_size or rows in self._policy.preferred_batch_sizes
            worker_free = self._pool.idle_count() > self._unstarted
            waited = time.perf_counter() - oldest.arrived
            delay = self._policy.max_queue_delay_ms / 1000
            if full or (worker_free and (not self._running or waited >= delay)):
                for waiting in taken:
                    self._pending.remove(waiting)
                self._send(taken)
                await asyncio.sleep(0)  # let the batch's task take its worker
                continue
            # Woken by a new call, a worker set free, or (with a worker free) the delay's end.
            self._wakeup.clear()
            timeout = max(delay - waited, 0.0) if worker_free else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _take(self, group: list[_Waiting]) -> list[_Waiting]:
        """The calls of the next batch: the oldest alike calls up to max_batch_size rows (the
        first always, however many rows it has), cut back to the largest preferred size."""
        taken: list[_Waiting] = []
        rows = 0
        for waiting in group:
            if taken and rows + waiting.rows > self._policy.max_batch_size:
                break
            taken.append(waiting)
            rows += waiting.rows
        preferred = [size for size in self._policy.preferred_batch_sizes if size <= rows]
        if preferred and rows not in preferred:
            best = max(preferred)
            cut, running = 0, 0
            for index, waiting in enumerate(taken):
                running += waiting.rows
                if running == best:
                    cut = index + 1
                    break
            if cut:
                taken = taken[:cut]
        return taken

    def _send(self, batch: list[_Waiting]) -> None:
        now = time.perf_counter()
        for waiting in batch:
            self._observer.waited(self._label, now - waiting.arrived)
        rows = sum(waiting.rows for waiting in batch)
        self._observer.batch(self._label, rows)
        self._running += 1
        span = tracing.batch(
            [(waiting.trace, waiting.arrived) for waiting in batch],
            now,
            {
                tracing.MODEL: self._label,
                tracing.OBJECT_ID: self._object_id,
                tracing.BATCH_SIZE: rows,
                tracing.BATCH_CALLS: len(batch),
            },
        )
        task = asyncio.create_task(self._run_batch(batch, batch[0].method, self._Start(self), span))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    class _Start:
        """One call sent to the pool: counted in `_unstarted` until it has its worker (or ends)."""

        def __init__(self, batcher: Batcher) -> None:
            self._batcher = batcher
            self._pending = True
            batcher._unstarted += 1

        def __call__(self) -> None:  # the pool's on_start: a worker was taken
            if self._pending:
                self._pending = False
                self._batcher._unstarted -= 1
                self._batcher._wakeup.set()

        def end(self) -> None:
            self()  # never got a worker: no longer about to take one
            self._batcher._wakeup.set()  # less load now: the loop may look again

    async def _run_batch(
        self, batch: list[_Waiting], method: str, on_start: Batcher._Start, span: contextlib.AbstractContextManager[Any]
    ) -> None:
        """span: the batch's (server.tracing), current while it runs: the pool's spans go under it."""
        with span:
            await self._run_batch_now(batch, method, on_start)

    async def _run_batch_now(self, batch: list[_Waiting], method: str, on_start: Batcher._Start) -> None:
        caller_gone = asyncio.ensure_future(_all_cancelled([waiting.answer for waiting in batch]))
        # This task's own context came from whichever task started it: the batch's deadline is
        # its callers' latest, which model code may ask for (deployd_worker.deadline()).
        caller_deadline_ns.set(latest(waiting.deadline_ns for waiting in batch))
        try:
            if len(batch) == 1:
                only = batch[0]
                message = protocol.Invoke(self._object_id, method, only.args, only.kwargs)
                running = asyncio.ensure_future(self._pool.call(message, only.buffers, on_start=on_start))
            else:
                merged = merge([(w.args, w.kwargs, w.buffers) for w in batch], [w.rows for w in batch])
                message = protocol.Invoke(self._object_id, method, merged.args, merged.kwargs)
                running = asyncio.ensure_future(self._pool.call(message, merged.buffers, on_start=on_start))
            await asyncio.wait({running, caller_gone}, return_when=asyncio.FIRST_COMPLETED)
            if not running.done():  # every caller gave up: abandon the batch like any call
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
                return
            try:
                result, buffers = running.result()
                # Checked alone too: a result that does not split fails whatever the load.
                pieces = split(result, buffers, [w.rows for w in batch])
            except Exception as error:
                for waiting in batch:
                    if not waiting.answer.done():
                        waiting.answer.set_exception(error)
                return
            for waiting, piece in zip(batch, pieces, strict=True):
                if not waiting.answer.done():
                    waiting.answer.set_result(piece)
        finally:
            self._running -= 1
            caller_gone.cancel()
            on_start.end()


async def _all_cancelled(answers: list[asyncio.Future[Any]]) -> None:
    """Returns once every caller's answer is cancelled (each caller gave up)."""
    for answer in answers:
        try:
            await asyncio.shield(answer)
        except asyncio.CancelledError:
            if not answer.cancelled():
                raise  # this waiter itself was cancelled
        except Exception:
            pass
        if not answer.cancelled():
            await asyncio.Future()  # someone still wants the answer: never returns
