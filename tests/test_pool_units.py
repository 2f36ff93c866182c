"""The pool as units: the supervisor with real worker processes that run no model code
(tests.pool_fakes.answering_worker), the dispatcher with stand-in handles fed the supervisor's
events, and the two joined as the daemon joins them.

Everything goes through public methods and events. Real model workers dying are in
test_resilience.py.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import wait as wait_for_sentinels
from pathlib import Path
from typing import Any

import pytest

from server.errors import Overloaded, PoolClosed, WorkerCrashed
from server.ipc import protocol
from server.pool.dispatcher import Dispatcher
from server.pool.events import WorkerEvent, WorkerExited, WorkerServing
from server.pool.procinfo import alive
from server.pool.supervisor import Supervisor
from server.pool.worker_handle import WorkerHandle, WorkerState, exit_code_of, start_child
from server.worker.entry import WorkerSettings
from tests.pool_fakes import FAIL_BOOT, AnsweringHandle, answering_worker, worker_failing_boot_on_request

Prepare = Callable[[WorkerHandle], Awaitable[None]]


async def _nothing(worker: WorkerHandle) -> None:
    pass


def make_supervisor(size: int, prepare: Prepare = _nothing) -> tuple[Supervisor, list[WorkerEvent]]:
    """A supervisor of answering workers, and the list its events go to."""
    supervisor = Supervisor(
        size, WorkerSettings(1, (), 65536), start_timeout=60, stop_timeout=5, prepare=prepare, target=answering_worker
    )
    events: list[WorkerEvent] = []
    supervisor.subscribe(events.append)
    return supervisor, events


async def wait_for(condition: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def summary(events: list[WorkerEvent]) -> list[tuple[str, int, int]]:
    return [(type(event).__name__, event.worker.index, event.worker.pid) for event in events]


async def stopped_cleanly(supervisor: Supervisor, events: list[WorkerEvent]) -> None:
    """Stop, and check that every worker that served has exited and is gone."""
    await supervisor.stop("the test is over")
    served = {event.worker.pid for event in events if isinstance(event, WorkerServing)}
    exited = {event.worker.pid for event in events if isinstance(event, WorkerExited)}
    assert served <= exited
    assert not [pid for pid in served if alive(pid)], "a worker process was left behind"


# ---------------------------------------------------------------------------- the supervisor


def test_a_dead_worker_is_replaced_and_the_events_say_so() -> None:
    async def run() -> None:
        supervisor, events = make_supervisor(2)
        await supervisor.start()
        first = [(status.index, status.state) for status in supervisor.status()]
        assert first == [(0, WorkerState.IDLE), (1, WorkerState.IDLE)]
        assert [name for name, _, _ in summary(events)] == ["WorkerServing", "WorkerServing"]
        assert supervisor.full_capacity
        old = supervisor.status()[0].pid
        os.kill(old, signal.SIGKILL)
        await wait_for(lambda: len(events) == 4)
        new = supervisor.status()[0].pid
        assert summary(events)[2:] == [("WorkerExited", 0, old), ("WorkerServing", 0, new)]
        exited = events[2]
        assert isinstance(exited, WorkerExited)
        assert (exited.reason, exited.cause, exited.stopped) == ("was killed by signal SIGKILL", "killed", False)
        assert [status.restarts for status in supervisor.status()] == [1, 0]
        assert supervisor.full_capacity
        await stopped_cleanly(supervisor, events)
        stops = [event for event in events[4:] if isinstance(event, WorkerExited)]
        assert sorted(event.worker.index for event in stops) == [0, 1]
        assert {(event.reason, event.cause, event.stopped) for event in stops} == {
            ("was stopped (the test is over)", "stopped", True)
        }
        assert supervisor.serving_count == 0

    asyncio.run(run())


def _exits_with_7() -> None:
    os._exit(7)


def _returns() -> None:
    pass


def test_an_exit_code_is_read_right_while_another_worker_starts() -> None:
    # Process.start polls every child on the thread that starts one, and a forkserver child's
    # exit code can be read once: unguarded, most of these read as "code 255".
    context = multiprocessing.get_context("forkserver")
    codes = []
    for _ in range(20):
        ended = context.Process(target=_exits_with_7)
        start_child(ended)
        wait_for_sentinels([ended.sentinel])
        starting = context.Process(target=_returns)
        starter = threading.Thread(target=start_child, args=(starting,))
        starter.start()
        codes.append(exit_code_of(ended, 0))
        starter.join()
        assert exit_code_of(starting, 30) == 0
    assert codes == [7] * 20


def test_a_replacement_that_cannot_boot_shows_why_in_status_and_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Real workers: once FAIL_BOOT exists, a new worker's boot fails at its address-space limit;
    it says so instead of greeting, and the slot shows it until a replacement boots."""
    reason = (
        r"WorkerCrashed: worker 0 failed to start: setting RLIMIT_AS to 1048576: ValueError: below the \d+"
        r" bytes this worker maps already \(it exited with code 1\)"
    )

    async def run() -> None:
        supervisor = Supervisor(
            1,
            WorkerSettings(1, (str(tmp_path),), 65536),
            start_timeout=60,
            stop_timeout=5,
            prepare=_nothing,
            target=worker_failing_boot_on_request,
        )
        events: list[WorkerEvent] = []
        supervisor.subscribe(events.append)
        await supervisor.start()
        (tmp_path / FAIL_BOOT).touch()
        os.kill(supervisor.status()[0].pid, signal.SIGKILL)
        await wait_for(lambda: supervisor.status()[0].last_failure)
        status = supervisor.status()[0]
        assert status.state is WorkerState.RESTARTING
        assert re.fullmatch(reason, status.last_failure), status.last_failure
        (tmp_path / FAIL_BOOT).unlink()
        await wait_for(lambda: supervisor.status()[0].state is WorkerState.IDLE)
        assert supervisor.status()[0].last_failure == ""
        await stopped_cleanly(supervisor, events)

    with caplog.at_level(logging.ERROR, logger="server.pool.supervisor"):
        asyncio.run(run())
    logged = rf"could not replace worker 0 \(retrying in [\d.]+s; 0 of 1 workers serve\): {reason}"
    assert re.search(logged, caplog.text), caplog.text


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
    failures: list[Exception], caplog: pytest.LogCaptureFixture
) -> None:
    prepared: list[int] = []

    async def prepare(worker: WorkerHandle) -> None:
        prepared.append(worker.pid)
        if 2 <= len(prepared) <= len(failures) + 1:  # the first starts; replacements fail, then one serves
            raise failures[len(prepared) - 2]

    async def run() -> list[tuple[WorkerState, str]]:
        supervisor, events = make_supervisor(1, prepare)
        await supervisor.start()
        seen: list[tuple[WorkerState, str]] = []

        def replaced() -> bool:
            status = supervisor.status()[0]
            if (status.state, status.last_failure) not in seen:
                seen.append((status.state, status.last_failure))
            return status.state is WorkerState.IDLE and len(prepared) == len(failures) + 2

        os.kill(prepared[0], signal.SIGKILL)
        await wait_for(lambda: supervisor.status()[0].state is WorkerState.RESTARTING)
        await wait_for(replaced)
        assert supervisor.status()[0].last_failure == "", "a replacement that served clears the failure"
        assert supervisor.status()[0].restarts == len(failures) + 1
        assert [name for name, _, _ in summary(events)] == ["WorkerServing"] + ["WorkerExited"] * (
            len(failures) + 1
        ) + ["WorkerServing"]
        failed = [event for event in events[2:-1] if isinstance(event, WorkerExited)]
        assert all(event.stopped and event.reason == "was stopped (preparing it failed)" for event in failed)
        await stopped_cleanly(supervisor, events)
        return seen

    with caplog.at_level(logging.ERROR, logger="server.pool.supervisor"):
        seen = asyncio.run(run())
    # Status showed the lost capacity, and why the replacement failed, while it did.
    assert seen[0] == (WorkerState.RESTARTING, "")
    last = failures[-1]
    assert (WorkerState.RESTARTING, f"{type(last).__name__}: {last}") in seen
    # Every failure logged; an unexpected one with its traceback.
    records = [record for record in caplog.records if "could not replace worker 0" in record.getMessage()]
    assert len(records) == len(failures)
    for record, failure in zip(records, failures, strict=True):
        assert bool(record.exc_info) == (not isinstance(failure, WorkerCrashed))


def test_a_worker_that_dies_while_being_prepared_is_replaced_once() -> None:
    """A replacement that dies during its replay is retried by the replacement under way, not
    also by a second one: a slot never gets two workers."""
    prepared: list[int] = []

    async def prepare(worker: WorkerHandle) -> None:
        prepared.append(worker.pid)
        if len(prepared) == 2:  # the first replacement: its replay kills it
            os.kill(worker.pid, signal.SIGKILL)
            await worker.request(protocol.HasAttr("o", "x"), [])

    async def run() -> None:
        supervisor, events = make_supervisor(1, prepare)
        await supervisor.start()
        os.kill(prepared[0], signal.SIGKILL)
        await wait_for(lambda: len(prepared) == 3 and supervisor.full_capacity)
        # A second replacement would start within the backoff (0.1 s, then 0.2 s): give it time.
        await asyncio.sleep(1.0)
        assert len(prepared) == 3, "the slot was replaced twice"
        serving = [event for event in events if isinstance(event, WorkerServing)]
        assert [event.worker.pid for event in serving] == [prepared[0], prepared[2]]
        assert supervisor.status()[0].pid == prepared[2]
        assert supervisor.status()[0].restarts == 2
        await stopped_cleanly(supervisor, events)

    asyncio.run(run())


# ---------------------------------------------------------------------------- the dispatcher


def serving_dispatcher(size: int, **options: Any) -> tuple[Dispatcher, list[Any]]:
    """A dispatcher told that `size` stand-in workers serve."""
    dispatcher = Dispatcher(**options)
    workers = [AnsweringHandle(index) for index in range(size)]
    for worker in workers:
        dispatcher.on_worker_event(WorkerServing(worker))  # type: ignore[arg-type]
    return dispatcher, workers


def exited(worker: Any, reason: str = "was killed by signal SIGKILL") -> WorkerExited:
    worker.alive = False
    worker.state = WorkerState.STOPPED
    return WorkerExited(worker, reason, "killed", stopped=False)


def test_session_steps_on_an_idle_worker_leave_it_free_once() -> None:
    async def run() -> None:
        dispatcher, (worker,) = serving_dispatcher(1)
        for _ in range(100):
            assert await dispatcher.call_on(0, worker.pid, protocol.ObjToValue("s", 1), []) == (worker.pid, [])
        assert dispatcher.idle_count() == 1
        assert await dispatcher.call(protocol.HasAttr("o", "x"), []) == (worker.pid, [])
        assert dispatcher.idle_count() == 1
        assert dispatcher.serving_workers() == [(0, worker.pid, WorkerState.IDLE)]
        assert worker.calls_served == 101

    asyncio.run(run())


def test_a_step_for_a_busy_worker_gets_it_before_calls_waiting_for_any() -> None:
    async def run() -> None:
        dispatcher, (worker,) = serving_dispatcher(1)
        worker.held = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "first"), []))
        await asyncio.sleep(0)
        assert worker.state is WorkerState.BUSY
        assert dispatcher.busy_count == 1
        waiting_call = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "second"), []))
        step = asyncio.ensure_future(dispatcher.call_on(0, worker.pid, protocol.ObjToValue("s", 1), []))
        await asyncio.sleep(0)
        assert dispatcher.queue_depth == 2
        worker.held.set_result(None)
        worker.held = None
        await asyncio.gather(running, waiting_call, step)
        assert worker.seen == ["HasAttr", "ObjToValue", "HasAttr"], "the pinned step first"
        assert dispatcher.queue_depth == 0
        with pytest.raises(WorkerCrashed, match="is gone"):
            await dispatcher.call_on(0, worker.pid + 1, protocol.ObjToValue("s", 1), [])  # a replaced worker

    asyncio.run(run())


def test_calls_wait_in_line_up_to_max_queued_calls() -> None:
    async def run() -> None:
        dispatcher, (worker,) = serving_dispatcher(1, max_queued_calls=1)
        worker.held = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "a"), []))
        waiting = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "b"), []))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match=r"1 calls already wait for one \(pool.max_queued_calls=1\)"):
            await dispatcher.call(protocol.HasAttr("o", "c"), [])
        worker.held.set_result(None)
        worker.held = None
        assert await asyncio.gather(running, waiting) == [(worker.pid, []), (worker.pid, [])]

    asyncio.run(run())


def test_after_worker_exited_its_steps_fail_and_calls_wait_for_a_replacement() -> None:
    async def run() -> None:
        dispatcher, (worker,) = serving_dispatcher(1)
        worker.held = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "running"), []))
        step = asyncio.ensure_future(dispatcher.call_on(0, worker.pid, protocol.ObjToValue("s", 1), []))
        await asyncio.sleep(0)
        dispatcher.on_worker_event(exited(worker))
        with pytest.raises(WorkerCrashed, match="worker 0 was killed by signal SIGKILL") as raised:
            await step
        assert not raised.value.started
        assert dispatcher.serving_workers() == []
        assert dispatcher.serving_count == 0
        with pytest.raises(WorkerCrashed, match="is gone"):
            await dispatcher.call_on(0, worker.pid, protocol.ObjToValue("s", 1), [])
        waiting = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "next"), []))
        worker.held.set_result(None)  # a late answer of the dead worker does not set it free
        await running
        await asyncio.sleep(0)
        assert not waiting.done() and dispatcher.idle_count() == 0
        replacement = AnsweringHandle(0, pid=2000)
        dispatcher.on_worker_event(WorkerServing(replacement))  # type: ignore[arg-type]
        assert await waiting == (2000, [])
        assert worker.seen == ["HasAttr"], "the dead worker got nothing after it exited"

    asyncio.run(run())


def test_a_call_handed_a_worker_that_exits_before_it_runs_waits_for_the_next() -> None:
    async def run() -> None:
        dispatcher, (worker,) = serving_dispatcher(1)
        worker.held = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "running"), []))
        waiting = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "waiting"), []))
        await asyncio.sleep(0)
        # Told right after the worker is handed to the waiting call, before that call runs.
        dispatcher.release_listeners.add(lambda: dispatcher.on_worker_event(exited(worker)))
        worker.held.set_result(None)
        await running
        await asyncio.sleep(0)
        assert not waiting.done() and dispatcher.queue_depth == 1
        dispatcher.on_worker_event(WorkerServing(AnsweringHandle(0, pid=2000)))  # type: ignore[arg-type]
        assert await waiting == (2000, [])
        assert worker.seen == ["HasAttr"]

    asyncio.run(run())


def test_close_fails_calls_waiting_for_a_worker() -> None:
    async def run() -> None:
        dispatcher, (worker,) = serving_dispatcher(1)
        worker.held = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "running"), []))
        waiting = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "waiting"), []))
        await asyncio.sleep(0)
        dispatcher.close()
        with pytest.raises(PoolClosed):
            await waiting
        with pytest.raises(PoolClosed):
            await dispatcher.call(protocol.HasAttr("o", "late"), [])
        worker.held.set_result(None)
        assert await running == (worker.pid, [])

    asyncio.run(run())


# ---------------------------------------------------------------------------- joined by events


def test_a_killed_worker_fails_its_steps_and_its_replacement_takes_the_calls() -> None:
    async def run() -> None:
        supervisor, events = make_supervisor(1)
        dispatcher = Dispatcher()
        supervisor.subscribe(dispatcher.on_worker_event)
        await supervisor.start()
        [(slot, pid, state)] = dispatcher.serving_workers()
        assert (slot, state) == (0, WorkerState.IDLE)
        assert await dispatcher.call(protocol.HasAttr("o", "x"), []) == (pid, [])
        running = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "sleep:60"), []))
        await wait_for(lambda: dispatcher.busy_count == 1)
        step = asyncio.ensure_future(dispatcher.call_on(0, pid, protocol.ObjToValue("s", 1), []))
        await wait_for(lambda: dispatcher.queue_depth == 1)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed, match=f"worker 0 \\(pid {pid}\\) was killed by signal SIGKILL while serving"):
            await running
        with pytest.raises(WorkerCrashed, match="worker 0 was killed by signal SIGKILL") as raised:
            await step
        assert not raised.value.started
        await wait_for(lambda: isinstance(events[-1], WorkerServing) and len(events) == 3)
        new = events[-1].worker.pid
        assert new != pid
        assert dispatcher.serving_workers() == [(0, new, WorkerState.IDLE)]
        assert await dispatcher.call(protocol.HasAttr("o", "x"), []) == (new, [])
        assert supervisor.status()[0].calls_served == 1
        dispatcher.close()
        await stopped_cleanly(supervisor, events)
        assert dispatcher.serving_count == 0

    asyncio.run(run())


# ---------------------------------------------------------------------------- placement


def test_a_placed_call_goes_only_to_its_slots() -> None:
    async def run() -> None:
        dispatcher, workers = serving_dispatcher(3)
        for _ in range(20):
            assert await dispatcher.call(protocol.HasAttr("o", "x"), [], slots=(1,)) == (workers[1].pid, [])
        pids = {(await dispatcher.call(protocol.HasAttr("o", "x"), [], slots=(0, 2)))[0] for _ in range(20)}
        assert pids <= {workers[0].pid, workers[2].pid}
        assert dispatcher.idle_count((0, 2)) == 2 and dispatcher.idle_count() == 3
        assert dispatcher.serving_in((1, 2)) == 2 and dispatcher.serving_in(None) == 3
        outcomes = await dispatcher.broadcast(protocol.HasAttr("o", "x"), [], (0, 2))
        assert [worker.index for worker, _ in outcomes] == [0, 2]

    asyncio.run(run())


def test_a_worker_set_free_goes_to_the_first_waiter_that_may_use_it() -> None:
    async def run() -> None:
        dispatcher, (zero, one) = serving_dispatcher(2)
        zero.held = asyncio.get_running_loop().create_future()
        one.held = asyncio.get_running_loop().create_future()
        busy = [asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "busy"), [], slots=(i,))) for i in (0, 1)]
        await asyncio.sleep(0)
        # In line: one for slot 0, then one for slot 1, then one for any.
        for_zero = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "a"), [], slots=(0,)))
        await asyncio.sleep(0)
        for_one = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "b"), [], slots=(1,)))
        await asyncio.sleep(0)
        for_any = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "c"), []))
        await asyncio.sleep(0)
        assert dispatcher.queue_depth == 3
        # Worker 1 set free: the waiter for slot 0, first in line, cannot use it; the one for slot 1 can.
        one.held.set_result(None)
        one.held = None
        assert await for_one == (one.pid, [])
        assert not for_zero.done()
        assert await for_any == (one.pid, [])  # worker 1 again, before worker 0 is free
        zero.held.set_result(None)
        zero.held = None
        assert await for_zero == (zero.pid, [])
        await asyncio.gather(*busy)
        assert dispatcher.queue_depth == 0 and dispatcher.idle_count() == 2

    asyncio.run(run())


def test_a_placed_call_that_gives_up_leaves_the_line() -> None:
    async def run() -> None:
        dispatcher, (worker,) = serving_dispatcher(1)
        worker.held = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "busy"), []))
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(dispatcher.call(protocol.HasAttr("o", "x"), [], slots=(0,)))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert dispatcher.queue_depth == 0
        worker.held.set_result(None)
        worker.held = None
        await running
        assert dispatcher.idle_count() == 1

    asyncio.run(run())
