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
