"""Never lose the server: worker deaths of every kind, hung models, overload, memory limits,
loads that kill workers, shutdown with calls in flight, and a daemon that is SIGKILLed.

Every test runs its own daemon (they kill workers or stop it); the fixture's teardown
checks that no process or shared-memory segment is left behind.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from client import (
    DeadlineExceededError,
    DeployError,
    InterpreterManager,
    NotFoundError,
    ReplicatedObj,
    ResourceExhaustedError,
    Retry,
    UnavailableError,
)
from server.pool.procinfo import alive, descendants_of
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, shm_segments, wait_until
from tests.test_lifecycle import wait_for_replacement, worker_pids
from tests.test_operations import check_health

CAPACITY = "deployd.v1.Deployd/capacity"


@pytest.fixture
def daemon_with(package_dir: Path, tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """daemon_with(section={...}, env={...}): a daemon of the test's own with extra config."""
    started: list[DaemonProcess] = []

    def start(env: dict[str, str] | None = None, **sections: Any) -> DaemonProcess:
        config = write_config(tmp_path / f"config-{len(started)}.yaml", package_dir, **sections)
        started.append(DaemonProcess(config, env=env).start())
        return started[-1]

    yield start
    for process in started:
        process.assert_clean_stop()


def load_scale(manager: InterpreterManager, package_dir: Path) -> ReplicatedObj:
    return manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")


class Background:
    """Callers that keep calling while a test breaks things; they record every failure."""

    def __init__(self, call: Callable[[], Any], threads: int = 2) -> None:
        self.calls = 0
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(call,)) for _ in range(threads)]

    def _run(self, call: Callable[[], Any]) -> None:
        deadline = time.monotonic() + 120  # bounded, whatever the test does
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                call()
                self.calls += 1
            except BaseException as error:
                self.failures.append(error)

    def __enter__(self) -> Background:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run call in a thread; the dict gets its "result" or "error"."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def busy_pids(manager: InterpreterManager) -> set[int]:
    return {worker.pid for worker in manager.status().workers if worker.state == "busy"}


# ---------------------------------------------------------------------------- worker death


DEATHS = [
    # (method, args, what the caller is told)
    ("exit_now", (3,), "exited with code 3"),
    ("raise_system_exit", (4,), "exited with code 4"),
    ("segfault", (), "was killed by signal SIGSEGV"),
]


@pytest.mark.parametrize("data_ports", [-1, 0], ids=["daemon-path", "direct"])
def test_every_kind_of_worker_death_fails_only_its_call(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path, data_ports: int
) -> None:
    """Each death a call causes fails that call, named as the cause; the calls of other callers
    that waited behind it never ran and are sent again (the daemon requeues them; on a data port
    the client resends them): none fails. The same words on both paths."""
    daemon = daemon_with(pool={"data_ports": data_ports})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        scale = load_scale(manager, package_dir)
        x = torch.arange(4.0)
        with Background(lambda: torch.equal(scale(x), x * 2) or pytest.fail("wrong result")) as others:
            for method, args, told in DEATHS:
                before = worker_pids(manager)
                with pytest.raises(UnavailableError, match=told) as raised:
                    scale.call_method(method, *args)
                assert raised.value.call_killed_worker, f"{method}: the daemon should mark the call as the cause"
                wait_for_replacement(manager, before)
        assert others.calls > 0 and not others.failures, f"other callers saw {others.failures[:3]}"
        # Killed from outside in the middle of a call (the only one in flight): the call is not to blame.
        before = worker_pids(manager)
        thread, outcome = in_thread(lambda: scale.call_method("nap", 30))
        assert wait_until(lambda: len(busy_pids(manager)) >= 1, 10)
        victim = next(iter(busy_pids(manager)))
        os.kill(victim, signal.SIGKILL)
        thread.join(30)
        error = outcome.get("error")
        assert isinstance(error, UnavailableError) and "SIGKILL" in error.details
        assert not error.call_killed_worker
        wait_for_replacement(manager, before)
        assert sum(worker.restarts for worker in manager.status().workers) == len(DEATHS) + 1


def test_retries_hide_a_worker_killed_from_outside_but_never_repeat_a_poison_call(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    daemon = daemon_with()
    with InterpreterManager(daemon.target, timeout=60, retry=Retry(attempts=4)) as manager:
        scale = load_scale(manager, package_dir)
        thread, outcome = in_thread(lambda: scale.call_method("nap", 1.0))
        assert wait_until(lambda: len(busy_pids(manager)) == 1, 10)
        victim = next(iter(busy_pids(manager)))
        os.kill(victim, signal.SIGKILL)
        thread.join(30)
        assert "error" not in outcome, outcome
        assert outcome["result"] != victim, "the retry ran on a live worker"
        # A call that kills its worker is tried once, however many attempts the policy allows.
        wait_for_replacement(manager, {victim})
        restarts_before = sum(worker.restarts for worker in manager.status().workers)
        with pytest.raises(UnavailableError, match="exited with code 5") as raised:
            scale.call_method("exit_now", 5)
        assert raised.value.call_killed_worker
        assert wait_until(lambda: len(worker_pids(manager)) == 2, 30)
        time.sleep(0.5)  # room for a wrongful retry to kill another worker
        assert sum(worker.restarts for worker in manager.status().workers) == restarts_before + 1


def test_poison_call_carries_a_negative_retry_pushback(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    daemon = daemon_with()
    with InterpreterManager(daemon.target, timeout=60) as manager:
        object_id = load_scale(manager, package_dir).id
    from client._values import to_wire
    from deployd_wire.proto import deployd_pb2 as pb
    from deployd_wire.proto import deployd_pb2_grpc as pb_grpc

    request = pb.InvokeRequest(object_id=object_id, method="exit_now")
    to_wire(6, request.args.add())
    with grpc.insecure_channel(daemon.target) as channel, pytest.raises(grpc.RpcError) as raised:
        pb_grpc.DeploydStub(channel).Invoke(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ("grpc-retry-pushback-ms", "-1") in tuple(raised.value.trailing_metadata())


# Model code that writes a frame of its own into its worker's channel: a reply whose tensor
# lies in a shared-memory segment the daemon never lent.
FORGED_REPLY = """
import marshal, os, struct
from server.ipc import protocol

def forge():
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the descriptor listdir itself used
            continue
        if target.startswith("socket:"):
            tag = protocol._TAG_OF[protocol.Result]
            header = marshal.dumps((10**6, tag, (None,), [("deployd-never-lent", 0, 8)], {}))
            os.write(int(name), struct.pack("<I", len(header)) + header)
            return True
    return False
"""


def test_a_worker_that_writes_a_frame_the_daemon_cannot_take_is_replaced(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    # No data ports: the forger writes to the worker's first socket, which must be the daemon's.
    fresh_daemon = daemon_with(pool={"data_ports": -1})
    with InterpreterManager(fresh_daemon.target, timeout=60) as manager:
        scale = load_scale(manager, package_dir)
        manager.register_module_source("forged_reply", FORGED_REPLY)
        before = worker_pids(manager)
        # Before the fix the daemon's reader died silently and this call waited for good.
        with pytest.raises(UnavailableError, match="was killed by signal SIGKILL"):
            scale.options(timeout=30).call_method("call_module", "forged_reply", "forge")
        wait_for_replacement(manager, before, timeout=30)
        assert torch.equal(scale(torch.ones(1)), torch.full((1,), 2.0))
    assert "sent a malformed frame" in fresh_daemon.log


# ---------------------------------------------------------------------------- hung, overloaded, too big


def test_hung_model_loses_its_worker_after_the_grace(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    daemon = daemon_with(pool={"abandoned_call_grace_seconds": 1.0, "data_ports": -1})  # the daemon path's grace
    with InterpreterManager(daemon.target, timeout=60) as manager:
        scale = load_scale(manager, package_dir)
        before = worker_pids(manager)
        with pytest.raises(DeadlineExceededError):
            scale.options(timeout=1.0).call_method("spin")
        gave_up = time.monotonic()
        assert len(busy_pids(manager)) == 1, "the spinning worker should be held, not reused"
        wait_for_replacement(manager, before, timeout=15)
        restored_after = time.monotonic() - gave_up
        assert restored_after < 6, f"full capacity took {restored_after:.1f}s to return"
        # Full capacity: two calls run at once again.
        started = time.monotonic()
        threads = [in_thread(lambda: scale.call_method("nap", 1.0)) for _ in range(2)]
        for thread, _ in threads:
            thread.join(30)
        assert {outcome["result"] for _, outcome in threads} == worker_pids(manager)
        assert time.monotonic() - started < 1.9
    assert "a call ran 1s past its caller giving up" in daemon.log


def test_changes_queued_behind_a_hung_call_succeed_when_its_worker_is_killed(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    """A load, a module registration and an unload each wait behind a hung call on one worker;
    that worker is killed after the grace, for a reason none of them caused: each succeeds,
    and the replacement gets what they changed by replay."""
    daemon = daemon_with(pool={"abandoned_call_grace_seconds": 1.0})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        scale = load_scale(manager, package_dir)
        package = manager.load_package(package_dir / "models.pt")

        def behind_a_hung_call(change: Callable[[], Any]) -> Any:
            before = worker_pids(manager)
            with pytest.raises(DeadlineExceededError):
                scale.options(timeout=0.5).call_method("spin")
            result = change()  # before the fix: UNAVAILABLE "it killed the worker"
            wait_for_replacement(manager, before, timeout=30)
            return result

        def on_both_workers(obj: ReplicatedObj, method: str, *args: Any) -> list[Any]:
            threads = [in_thread(lambda: obj.call_method(method, *args)) for _ in range(2)]
            for thread, _ in threads:
                thread.join(30)
            assert all("result" in outcome for _, outcome in threads), threads
            return [outcome["result"] for _, outcome in threads]

        loaded = behind_a_hung_call(lambda: package.load_pickle("models", "scale.pkl"))
        assert set(on_both_workers(loaded, "nap", 0.5)) == worker_pids(manager), "replayed into the new worker"

        behind_a_hung_call(lambda: manager.register_module_source("queued_module", "ANSWER = 42\n"))
        answers = on_both_workers(loaded, "call_module", "queued_module", "__getattribute__", "ANSWER")
        assert answers == [42, 42]

        behind_a_hung_call(loaded.unload)
        with pytest.raises(NotFoundError):
            loaded(torch.ones(1))
        assert [obj.object_id for obj in manager.status().objects] == [scale.id]
    assert "it killed the worker" not in daemon.log
    assert "will get it by replay" in daemon.log


def test_a_call_over_the_servers_limit_kills_its_worker(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    daemon = daemon_with(pool={"max_call_seconds": 1.0})
    with InterpreterManager(daemon.target, timeout=60, retry=Retry(attempts=3)) as manager:
        scale = load_scale(manager, package_dir)
        before = worker_pids(manager)
        started = time.monotonic()
        with pytest.raises(UnavailableError, match=r"ran over pool\.max_call_seconds \(1s\)") as raised:
            scale.call_method("spin")  # the caller set a deadline of 60 s; the server's limit is 1 s
        assert time.monotonic() - started < 5
        assert raised.value.call_killed_worker, "a call that hangs would hang again: not retried"
        wait_for_replacement(manager, before)
        assert scale.call_method("nap", 0.5) in worker_pids(manager), "calls under the limit run"


def test_a_flood_past_the_queue_bound_fails_at_once(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    daemon = daemon_with(pool={"max_queued_calls": 2, "data_ports": -1})  # the daemon's queue
    with InterpreterManager(daemon.target, timeout=60) as manager:
        scale = load_scale(manager, package_dir)
        running = [in_thread(lambda: scale.call_method("nap", 2.0)) for _ in range(2)]
        assert wait_until(lambda: len(busy_pids(manager)) == 2, 10)
        queued = [in_thread(lambda: scale.call_method("nap", 0.01)) for _ in range(2)]
        assert wait_until(lambda: manager.status().queued_calls == 2, 10)
        started = time.monotonic()
        with pytest.raises(ResourceExhaustedError, match=r"pool\.max_queued_calls=2"):
            scale(torch.ones(1))
        assert time.monotonic() - started < 1.0, "an overloaded call should fail at once, not wait"
        for thread, outcome in running + queued:
            thread.join(30)
            assert "error" not in outcome, outcome
        assert manager.status().queued_calls == 0
        assert torch.equal(scale(torch.ones(1)), torch.full((1,), 2.0))


def test_memory_limit_kills_only_the_worker_over_it(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    limit = 500 * 2**20  # a fresh worker holds ~150 MB of anonymous memory
    daemon = daemon_with(worker={"memory_limit_bytes": limit})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        scale = load_scale(manager, package_dir)
        assert scale.call_method("hog", 50) == 50 * 2**20, "a call under the limit runs"
        before = worker_pids(manager)
        with pytest.raises(UnavailableError, match=r"used \d+ MiB of memory, over worker.memory_limit_bytes") as raised:
            scale.call_method("hog", 800)
        assert raised.value.call_killed_worker
        wait_for_replacement(manager, before)
        assert torch.equal(scale(torch.ones(1)), torch.full((1,), 2.0))


def test_memory_limit_below_a_fresh_worker_refuses_to_start(package_dir: Path, tmp_path: Path) -> None:
    process = DaemonProcess(
        write_config(tmp_path / "config.yaml", package_dir, worker={"memory_limit_bytes": 10 * 2**20})
    )
    with pytest.raises(AssertionError, match="exited with 1"):
        process.start()
    assert "is below what a fresh worker already uses" in process.log
    processes, segments = process.leftovers()
    assert not processes and not segments


@pytest.mark.parametrize("data_ports", [-1, 0], ids=["daemon-path", "data-ports"])
def test_a_worker_that_cannot_boot_says_why_in_the_log(package_dir: Path, tmp_path: Path, data_ports: int) -> None:
    """An address-space limit below what a fresh worker maps: the worker names the step that
    failed and its error instead of greeting, and the daemon, which cannot start, logs it."""
    limit = 64 * 2**20
    process = DaemonProcess(
        write_config(
            tmp_path / "config.yaml",
            package_dir,
            worker={"max_address_space_bytes": limit},
            pool={"data_ports": data_ports},
        )
    )
    with pytest.raises(AssertionError, match="exited with 1"):
        process.start()
    reason = (
        rf"worker 0 failed to start: setting RLIMIT_AS to {limit}: ValueError: below the \d+ bytes this"
        r" worker maps already \(it exited with code 1\)"
    )
    assert re.search(rf"cannot start: {reason}", process.log), process.log
    processes, segments = process.leftovers()
    assert not processes and not segments


# ---------------------------------------------------------------------------- loads that kill workers


def test_a_load_that_kills_workers_fails_and_the_pool_recovers(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "poison-marker"
    marker.touch()
    daemon = daemon_with(env={"DEPLOYD_TEST_POISON_MARKER": str(marker)})
    with InterpreterManager(daemon.target, timeout=60, retry=Retry(attempts=3)) as manager:
        package = manager.load_package(package_dir / "models.pt")
        before = worker_pids(manager)
        killed = r"cannot load pickle.*it killed the worker.*exited with code 7"
        with pytest.raises(UnavailableError, match=killed) as raised:
            package.load_pickle("models", "dies_in_new_workers.pkl")
        assert raised.value.call_killed_worker
        wait_for_replacement(manager, before)
        assert len(manager.status().objects) == 0
        scale = package.load_pickle("models", "scale.pkl")
        assert torch.equal(scale(torch.ones(1)), torch.full((1,), 2.0))


def test_an_object_whose_replay_kills_new_workers_is_evicted(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "poison-marker"
    daemon = daemon_with(env={"DEPLOYD_TEST_POISON_MARKER": str(marker)})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        package = manager.load_package(package_dir / "models.pt")
        fragile = package.load_pickle("models", "dies_in_new_workers.pkl")
        scale = package.load_pickle("models", "scale.pkl")
        marker.touch()  # from now on, replaying `fragile` kills the worker it is replayed into
        before = worker_pids(manager)
        os.kill(next(iter(before)), signal.SIGKILL)
        # While the slot cannot be refilled, the lost capacity shows, and why.
        failing = [w for w in manager.status().workers if w.last_failure]
        assert wait_until(
            lambda: failing.extend(w for w in manager.status().workers if w.last_failure) or failing, 10, 0.02
        )
        assert failing[0].state == "restarting" and "exited with code 7" in failing[0].last_failure
        assert check_health(daemon.target, CAPACITY) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert check_health(daemon.target, "") == health_pb2.HealthCheckResponse.SERVING  # one worker still serves
        wait_for_replacement(manager, before, timeout=30)
        assert wait_until(lambda: check_health(daemon.target, CAPACITY) == health_pb2.HealthCheckResponse.SERVING, 10)
        assert not any(w.last_failure for w in manager.status().workers)
        with pytest.raises(NotFoundError, match=r"evicted: replaying object .* killed each"):
            fragile(torch.ones(1))
        assert [o.object_id for o in manager.status().objects] == [scale.id]
        assert torch.equal(scale(torch.ones(1)), torch.full((1,), 2.0))
    assert "evicted" in daemon.log


# ---------------------------------------------------------------------------- the daemon's own end


def test_sigterm_lets_calls_in_flight_finish(daemon_with: Callable[..., DaemonProcess], package_dir: Path) -> None:
    daemon = daemon_with(server={"shutdown_grace_seconds": 20.0})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        scale = load_scale(manager, package_dir)
        calls = [in_thread(lambda: scale.call_method("nap", 1.5)) for _ in range(2)]
        assert wait_until(lambda: len(busy_pids(manager)) == 2, 10)
        daemon.children = descendants_of(daemon.pid)
        daemon.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        time.sleep(0.3)
        with pytest.raises(UnavailableError):
            manager.status()  # new calls are refused while the old ones finish
        for thread, outcome in calls:
            thread.join(30)
            assert "error" not in outcome, f"a call in flight failed on SIGTERM: {outcome}"
    assert daemon.process.wait(30) == 0  # type: ignore[union-attr]
    processes, segments = daemon.leftovers()
    assert not processes and not segments


def test_a_second_signal_skips_the_grace(daemon_with: Callable[..., DaemonProcess], package_dir: Path) -> None:
    daemon = daemon_with(server={"shutdown_grace_seconds": 120.0}, pool={"stop_timeout_seconds": 1.0})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        scale = load_scale(manager, package_dir)
        thread, outcome = in_thread(lambda: scale.call_method("nap", 60))
        assert wait_until(lambda: len(busy_pids(manager)) == 1, 10)
        daemon.children = descendants_of(daemon.pid)
        daemon.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        time.sleep(0.5)
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        assert daemon.process.wait(30) == 0  # type: ignore[union-attr]
        assert time.monotonic() - started < 10
        thread.join(30)
        assert isinstance(outcome.get("error"), DeployError)
    assert "second signal" in daemon.log
    processes, segments = daemon.leftovers()
    assert not processes and not segments


def test_a_sigkilled_daemon_leaves_no_workers_and_the_next_start_cleans_up(package_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", package_dir)
    first = DaemonProcess(config).start()
    try:
        with InterpreterManager(first.target, timeout=60) as manager:
            scale = load_scale(manager, package_dir)
            scale(torch.ones(1 << 16))  # large enough to go through (and leave) shared memory
            thread, _ = in_thread(lambda: scale.call_method("nap", 60))
            assert wait_until(lambda: len(busy_pids(manager)) == 1, 10)
            children = descendants_of(first.pid)
            assert len(children) >= 3  # the fork server and two workers
            left = {name for name in shm_segments() if name.startswith(f"deployd-{first.pid}-")}
            assert left, "the daemon should have made shared-memory segments"
            first.process.kill()  # type: ignore[union-attr]
            first.process.wait(10)  # type: ignore[union-attr]
            assert wait_until(lambda: not any(alive(pid) for pid in children), 10), "orphans outlived the daemon"
            thread.join(30)
    finally:
        first.kill()
    second = DaemonProcess(config).start()
    try:
        assert not {name for name in shm_segments() if name.startswith(f"deployd-{first.pid}-")}
        assert "shared-memory segments left by a daemon that died" in second.log
    finally:
        second.assert_clean_stop()


def test_a_replay_that_hangs_is_cut_off_and_evicted(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "poison-marker"
    daemon = daemon_with(pool={"start_timeout_seconds": 2.0}, env={"DEPLOYD_TEST_POISON_MARKER": str(marker)})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        package = manager.load_package(package_dir / "models.pt")
        fragile = package.load_pickle("models", "dies_in_new_workers.pkl")
        marker.write_text("hang")  # from now on, replaying `fragile` never finishes
        before = worker_pids(manager)
        os.kill(next(iter(before)), signal.SIGKILL)
        wait_for_replacement(manager, before, timeout=30)
        with pytest.raises(NotFoundError, match=r"evicted: .* took over 2s"):
            fragile(torch.ones(1))
        # Loads were held only while a replay ran, never for good.
        scale = package.load_pickle("models", "scale.pkl")
        assert torch.equal(scale(torch.ones(1)), torch.full((1,), 2.0))
