"""The pool's supervision as a unit: replacing a worker that keeps failing to start, in any way.

The worker processes are stood in for (spawn_worker is replaced); everything else is the
real WorkerPool. Real worker deaths are in test_resilience.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from server.errors import WorkerCrashed
from server.ipc import protocol
from server.pool import worker_pool as pool_module
from server.pool.worker_pool import WorkerPool
from server.worker.entry import WorkerSettings


class DeadWorker:
    """What a slot holds after its worker died: enough of a WorkerHandle for status()."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 999_999_999
        self.state = "stopped"
        self.calls_served = 0
        self.alive = False


async def _nothing(worker: Any) -> None:
    pass


def make_pool(size: int = 1) -> WorkerPool:
    return WorkerPool(size, WorkerSettings(1, (), 65536), start_timeout=5, stop_timeout=1, prepare=_nothing)


@pytest.mark.parametrize(
    "failures",
    [
        [OSError(24, "Too many open files")],
        [protocol.ProtocolError("malformed frame header"), WorkerCrashed("worker 0 failed to start")],
        [RuntimeError("anything else")],
    ],
    ids=["oserror", "protocol-then-crash", "runtime"],
)
def test_a_replacement_that_fails_in_any_way_is_retried(
    failures: list[Exception], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pool_module, "_BACKOFF_STEP_SECONDS", 0.01)
    pool = make_pool()
    pool._workers[0] = DeadWorker(0)  # type: ignore[assignment]
    attempts: list[int] = []
    seen_while_failing: list[tuple[str, str]] = []

    async def spawn_worker(index: int) -> Any:
        status = pool.status()[0]
        seen_while_failing.append((status.state, status.last_failure))
        attempts.append(index)
        if len(attempts) <= len(failures):
            raise failures[len(attempts) - 1]

    monkeypatch.setattr(pool, "spawn_worker", spawn_worker)
    with caplog.at_level(logging.ERROR, logger="server.pool.worker_pool"):
        asyncio.run(asyncio.wait_for(pool.restart_worker(0), 10))
    assert len(attempts) == len(failures) + 1, "the slot was given up on"
    # Status showed the lost capacity, and why the replacement failed, while it did.
    assert seen_while_failing[0] == ("restarting", "")
    last = failures[-1]
    assert seen_while_failing[-1] == ("restarting", f"{type(last).__name__}: {last}")
    assert pool.status()[0].last_failure == "", "a replacement that served clears the failure"
    # Every failure logged; an unexpected one with its traceback.
    records = [record for record in caplog.records if "could not replace worker 0" in record.getMessage()]
    assert len(records) == len(failures)
    for record, failure in zip(records, failures, strict=True):
        assert bool(record.exc_info) == (not isinstance(failure, WorkerCrashed))


class AnsweringWorker:
    """A stand-in worker that answers every request at once with its own pid (or, held, when let go)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 1000 + index
        self.state = "starting"
        self.calls_served = 0
        self.alive = True
        self.held: asyncio.Future[Any] | None = None
        self.seen: list[str] = []

    def send(self, message: Any, buffers: list[Any]) -> asyncio.Future[Any]:
        self.seen.append(type(message).__name__)
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        frame = protocol.Frame(0, protocol.Result(self.pid), [], {})
        if self.held is None:
            reply.set_result(frame)
        else:
            self.held.add_done_callback(lambda _: reply.set_result(frame))
        return reply


def serving_pool(size: int) -> tuple[WorkerPool, list[AnsweringWorker]]:
    pool = make_pool(size)
    workers = [AnsweringWorker(index) for index in range(size)]
    for worker in workers:
        pool._workers[worker.index] = worker  # type: ignore[assignment]
        pool._serving.add(worker)  # type: ignore[arg-type]
        pool._free(worker)  # type: ignore[arg-type]
    return pool, workers


def test_session_steps_on_an_idle_worker_leave_one_entry_in_the_idle_queue() -> None:
    async def run() -> None:
        pool, (worker,) = serving_pool(1)
        for _ in range(100):
            assert await pool.call_on(0, worker.pid, protocol.ObjToValue("s", 1), []) == (worker.pid, [])
        assert pool._idle.qsize() == 1, "a step must not add an entry each time (it grew without bound)"
        assert await pool.call(protocol.HasAttr("o", "x"), []) == (worker.pid, [])
        assert pool.idle_count() == 1

    asyncio.run(run())


def test_a_step_for_a_busy_worker_gets_it_before_calls_waiting_for_any() -> None:
    async def run() -> None:
        pool, (worker,) = serving_pool(1)
        worker.held = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(pool.call(protocol.HasAttr("o", "first"), []))
        await asyncio.sleep(0)
        assert worker.state == "busy"
        waiting_call = asyncio.ensure_future(pool.call(protocol.HasAttr("o", "second"), []))
        step = asyncio.ensure_future(pool.call_on(0, worker.pid, protocol.ObjToValue("s", 1), []))
        await asyncio.sleep(0)
        assert pool.queue_depth == 2
        worker.held.set_result(None)
        worker.held = None
        await asyncio.gather(running, waiting_call, step)
        assert worker.seen == ["HasAttr", "ObjToValue", "HasAttr"], "the pinned step first"
        with pytest.raises(WorkerCrashed, match="is gone"):
            await pool.call_on(0, worker.pid + 1, protocol.ObjToValue("s", 1), [])  # a replaced worker

    asyncio.run(run())
