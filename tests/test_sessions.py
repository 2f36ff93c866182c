"""Sessions and Objs (torch::deploy's InterpreterSession and Obj) against the real daemon."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from client import (
    DeployError,
    FailedPreconditionError,
    InterpreterManager,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RemoteError,
    ResourceExhaustedError,
    UnavailableError,
)
from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc
from server.api.calls import MAX_MESSAGE_BYTES, call_handlers
from server.api.metrics import Metrics
from server.errors import NotFound
from tests.conftest import write_config
from tests.daemon_process import REPO, DaemonProcess, wait_until
from tests.test_operations import sample, scrape


@pytest.fixture
def daemon_with(package_dir: Path, tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """daemon_with(section={...}): a daemon of the test's own; its stop is checked for leftovers."""
    started: list[DaemonProcess] = []

    def start(**sections: Any) -> DaemonProcess:
        config = write_config(tmp_path / f"config-{len(started)}.yaml", package_dir, **sections)
        started.append(DaemonProcess(config).start())
        return started[-1]

    yield start
    for process in started:
        process.assert_clean_stop()


def pid_in(session: Any) -> int:
    return int(session.global_("os", "getpid")().to_value())


def test_the_issue_example(manager: InterpreterManager) -> None:
    with manager.acquire_one() as session:
        Module = session.global_("torch.nn", "Linear")  # from torch.nn import Linear
        layer = Module(4, 2)
        assert layer.type_name == "torch.nn.modules.linear.Linear"
        layer.attr("weight").attr("data").call_method("fill_", 0.5)
        layer.bias.data.fill_(0.0)  # attribute access: the same steps
        out = layer(torch.ones(1, 4))
        assert out.type_name == "torch.Tensor"
        assert torch.equal(out.to_value(), torch.full((1, 2), 2.0))
        x = session.from_value(torch.arange(4.0))
        assert torch.equal(layer(x).to_value(), torch.full((2,), 3.0)), "an Obj as an argument"
        assert layer.hasattr("weight") and not layer.hasattr("no_such")
        with pytest.raises(InvalidArgumentError, match=r"torch\.nn\.modules\.linear\.Linear has no value form"):
            layer.to_value()
        assert session.from_value({"a": [1, (2, 3.5)], "b": None}).to_value() == {"a": [1, (2, 3.5)], "b": None}


def test_every_step_runs_on_the_sessions_worker(manager: InterpreterManager) -> None:
    workers = {worker.index: worker.pid for worker in manager.status().workers}
    with manager.acquire_one() as session:
        assert workers[session.worker] == session.worker_pid
        assert {pid_in(session) for _ in range(5)} == {session.worker_pid}


def test_autograd_runs_in_a_session(manager: InterpreterManager) -> None:
    with manager.acquire_one() as session:
        t = session.global_("torch", "ones")(3, requires_grad=True)
        t.mul(2).sum().backward()
        assert torch.equal(t.grad.to_value(), torch.full((3,), 2.0))


def test_errors_in_a_step_are_the_models_and_the_session_goes_on(manager: InterpreterManager) -> None:
    with manager.acquire_one() as session:
        with pytest.raises(RemoteError) as raised:
            session.global_("no_such_module_here", "x")
        assert raised.value.remote_type == "ModuleNotFoundError"
        with pytest.raises(RemoteError, match="ZeroDivisionError"):
            session.from_value(1).call_method("__truediv__", 0)
        assert session.from_value(6).call_method("__floordiv__", 2).to_value() == 3


def test_an_obj_stays_in_its_session(manager: InterpreterManager) -> None:
    with manager.acquire_one() as first, manager.acquire_one() as second:
        x = first.from_value(torch.ones(2))
        with pytest.raises(FailedPreconditionError, match="lives in its own session"):
            second.global_("torch", "neg")(x)
        with pytest.raises(InvalidArgumentError, match="only be an argument of a session's call"):
            manager.model("anything")(x)  # a ReplicatedObj call takes values only
    with pytest.raises(FailedPreconditionError, match="has ended: closed by its client"):
        x.to_value()


def test_a_session_is_not_a_lock(manager: InterpreterManager, package_dir: Path) -> None:
    """Other callers keep using the session's worker between its steps; nested sessions in one
    thread never deadlock, even more of them than workers."""
    scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
    sessions = [manager.acquire_one() for _ in range(3)]
    try:
        assert len({session.worker for session in sessions[:2]}) == 2, "the least loaded worker first"
        pids = {scale.call_method("pid") for _ in range(30)}
        assert len(pids) == 2, "both workers still serve calls"
        for session in reversed(sessions):  # steps of all three, interleaved, from one thread
            assert pid_in(session) == session.worker_pid
    finally:
        for session in sessions:
            session.close()


def test_a_step_waits_while_its_worker_is_busy(daemon_with: Callable[..., DaemonProcess], package_dir: Path) -> None:
    daemon = daemon_with(pool={"workers": 1})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
        with manager.acquire_one() as session:
            napping = threading.Thread(target=lambda: scale.call_method("nap", 1.0))
            started = time.monotonic()
            napping.start()
            assert wait_until(lambda: manager.status().workers[0].state == "busy", 10)
            assert pid_in(session) == session.worker_pid
            assert time.monotonic() - started >= 0.9, "the step ran after the call holding its worker"
            napping.join(30)


def test_replicated_obj_and_package_sessions(manager: InterpreterManager, package_dir: Path) -> None:
    package = manager.load_package(package_dir / "models.pt")
    scale = package.load_pickle("models", "scale.pkl")
    with scale.acquire_session() as session:
        assert session.self is not None
        assert session.self.pid().to_value() == session.worker_pid, "self is that worker's replica"
        assert torch.equal(session.self(torch.ones(2)).to_value(), torch.full((2,), 2.0))
        replica = session.from_movable(scale)
        assert replica.describe("f=").to_value() == "f=2.0!"
    with package.acquire_session() as session:
        assert session.self is not None and "PackageImporter" in session.self.type_name
        made = session.self.load_pickle("models", "scale.pkl")
        assert made.describe("x").to_value() == "x2.0!"
        assert session.self.load_text("models", "notes.txt").to_value() == "weights: scale 2.0 ✓"


def test_all_instances_reach_every_worker(manager: InterpreterManager) -> None:
    pids = {worker.index: worker.pid for worker in manager.status().workers}
    instances = manager.all_instances()
    assert [instance.index for instance in instances] == sorted(pids)
    for instance in instances:
        with instance.acquire_session() as session:
            assert session.worker == instance.index and pid_in(session) == pids[instance.index]
    before = manager.count_registered_module_sources()
    manager.register_module_source("counted_module_for_sessions", "VALUE = 7\n")
    assert manager.count_registered_module_sources() == before + 1
    with manager.acquire_one() as session:
        assert session.global_("counted_module_for_sessions", "VALUE").to_value() == 7


def test_sessions_end_idle_when_their_worker_dies_and_when_the_client_goes(
    daemon_with: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_with(pool={"session_idle_seconds": 0.5})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        idle = manager.acquire_one()
        x = idle.from_value(1)
        time.sleep(1.5)
        with pytest.raises(FailedPreconditionError, match=r"no call for 0.5s \(pool.session_idle_seconds\)"):
            x.to_value()
        idle.close()  # ended already: nothing to do, no error

        doomed = manager.acquire_one()
        y = doomed.from_value(2)
        os.kill(doomed.worker_pid, signal.SIGKILL)
        with pytest.raises(UnavailableError, match=rf"its worker {doomed.worker} \(pid {doomed.worker_pid}\) died"):
            y.to_value()
        doomed.close()

    # A client that goes away without closing: its stream ends, and with it the session.
    gone = InterpreterManager(daemon.target, timeout=60)
    session = gone.acquire_one()
    session_id = session.id
    gone.close()
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.SessionsStub(channel)

        def ended() -> bool:
            try:
                stub.ToValue(pb.ObjRequest(session_id=session_id, obj_id=1), timeout=10)
            except grpc.RpcError as error:
                return error.code() == grpc.StatusCode.FAILED_PRECONDITION and "stream ended" in error.details()
            return False

        assert wait_until(ended, 10)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ToValue(pb.ObjRequest(session_id="no-such-session", obj_id=1), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_limits_on_sessions_and_their_objects(daemon_with: Callable[..., DaemonProcess]) -> None:
    daemon = daemon_with(limits={"max_sessions": 2, "max_session_objects": 3})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        with manager.acquire_one() as first, manager.acquire_one():
            with pytest.raises(ResourceExhaustedError, match=r"limits.max_sessions=2"):
                manager.acquire_one()
            for value in range(3):
                first.from_value(value)
            with pytest.raises(ResourceExhaustedError, match=r"holds 3 objects.*limits.max_session_objects=3"):
                first.from_value(4)
        with manager.acquire_one() as again:  # closing gave both back
            assert again.from_value(5).to_value() == 5


def test_sessions_need_an_admin_token(daemon_with: Callable[..., DaemonProcess]) -> None:
    daemon = daemon_with(auth={"admin_tokens": ["root"], "invoke_tokens": ["caller"]})
    with (
        InterpreterManager(daemon.target, timeout=30, token="caller") as caller,
        pytest.raises(PermissionDeniedError, match="OpenSession needs an admin token"),
    ):
        caller.acquire_one()
    with InterpreterManager(daemon.target, timeout=30, token="root") as admin, admin.acquire_one() as session:
        assert session.from_value(1).to_value() == 1


def test_a_daemon_with_open_sessions_stops_without_waiting_out_the_grace(
    daemon_with: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_with(server={"shutdown_grace_seconds": 20.0})
    manager = InterpreterManager(daemon.target, timeout=30)
    session = manager.acquire_one()
    session.from_value(torch.ones(3))
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10, "open sessions must not hold the drain"
    with pytest.raises(DeployError):
        session.from_value(1)
    manager.close()


def test_unknown_objects_and_bad_requests(manager: InterpreterManager) -> None:
    with manager.acquire_one() as session:
        stub = pb_grpc.SessionsStub(manager._channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ToValue(pb.ObjRequest(session_id=session.id, obj_id=99))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND and "no object 99" in raised.value.details()
        with pytest.raises(NotFoundError):
            session.from_movable(manager.model("no-such-model"))
        with pytest.raises(InvalidArgumentError, match="needs a module and a name"):
            session.global_("", "x")


MAPS_PROBE = """
def mapped_file(address):
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(part, 16) for part in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else ""
    return ""
"""


def test_create_movable_replicates_a_session_object_to_every_worker_sharing_its_tensors(
    manager: InterpreterManager,
) -> None:
    manager.register_module_source("deployd_maps_probe", MAPS_PROBE)
    with manager.acquire_one() as session:
        layer = session.global_("torch.nn", "Linear")(4, 2)
        layer.weight.data.fill_(0.5)
        layer.bias.data.fill_(0.0)
        replicated = manager.create_movable(layer, session)
    assert replicated.package_id and replicated.object_id.startswith("obj-")
    for _ in range(4):  # whichever worker takes it
        assert torch.equal(replicated(torch.ones(1, 4)), torch.full((1, 2), 2.0))
    status = manager.status()
    assert replicated.package_id in {package.package_id for package in status.packages}
    for instance in manager.all_instances():
        with instance.acquire_session() as there:
            replica = there.from_movable(replicated)
            assert torch.equal(replica.weight.data.to_value(), torch.full((2, 4), 0.5))
            # TensorSerializationSharing: the replica's weights lie in the daemon's shared segment.
            where = there.global_("deployd_maps_probe", "mapped_file")(replica.weight.data_ptr()).to_value()
            assert where.startswith("/dev/shm/deployd-"), where
    replicated.unload()
    assert replicated.package_id not in {package.package_id for package in manager.status().packages}


def test_create_movable_of_a_package_object_by_name(manager: InterpreterManager, package_dir: Path) -> None:
    package = manager.load_package(package_dir / "models.pt")
    with package.acquire_session() as session:
        made = session.self.load_pickle("models", "scale.pkl")  # type: ignore[union-attr]
        made.factor.data.mul_(3.0)  # configured remotely before it is replicated
        replicated = manager.create_movable(made, session, name="tripled-scale")
    assert replicated.id == "tripled-scale" and replicated.version >= 1
    model = manager.model("tripled-scale")
    assert {float(model(torch.ones(1))[0]) for _ in range(4)} == {6.0}
    assert model.call_method("describe", "f=") == "f=6.0!"
    model.unload()


def test_create_movable_refuses_an_object_of_another_session(manager: InterpreterManager) -> None:
    with manager.acquire_one() as first, manager.acquire_one() as second:
        x = first.from_value(torch.ones(2))
        with pytest.raises(
            FailedPreconditionError, match="Cannot create movable from an object that lives in different session"
        ):
            manager.create_movable(x, second)
        with pytest.raises(InvalidArgumentError, match="cannot create a movable from an object of type"):
            manager.create_movable(first.global_("threading", "Lock")(), first)


def test_a_movable_reaches_a_replacement_worker(daemon_with: Callable[..., DaemonProcess]) -> None:
    daemon = daemon_with()
    with InterpreterManager(daemon.target, timeout=60) as manager:
        with manager.acquire_one() as session:
            replicated = manager.create_movable(session.from_value(torch.arange(3.0)), session)
        victim = manager.status().workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        assert wait_until(
            lambda: (
                {w.state for w in manager.status().workers} == {"idle"}
                and manager.status().workers[0].pid != victim.pid
            ),
            60,
        )
        with manager.all_instances()[0].acquire_session() as there:
            assert torch.equal(there.from_movable(replicated).to_value(), torch.arange(3.0))


def test_status_and_the_cli_show_open_sessions(manager: InterpreterManager, daemon: DaemonProcess) -> None:
    with manager.acquire_one() as session:
        session.from_value(1)
        session.from_value(2)
        shown = {entry.session_id: entry for entry in manager.status().sessions}
        assert shown[session.id].objects == 2 and shown[session.id].worker == session.worker
        report = subprocess.run(
            [sys.executable, "-m", "deployd_cli", "status", "--json", "--address", daemon.target],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        sessions = {entry["session_id"]: entry for entry in json.loads(report.stdout)["sessions"]}
        assert sessions[session.id]["objects"] == 2
    assert session.id not in {entry.session_id for entry in manager.status().sessions}


LONG_OBJECT_ID = "o" * 20_000


def test_a_long_object_id_is_not_found_with_its_message_cut(daemon_with: Callable[..., DaemonProcess]) -> None:
    """Issue 21, item 7: OpenSession (a stream) goes through the same wrapper as every unary
    handler, so an object_id of 20,000 characters answers NOT_FOUND with its message cut to
    MAX_MESSAGE_BYTES, not RESOURCE_EXHAUSTED ("received metadata size exceeds hard limit");
    at the opening and in a step (FromMovable) alike. The failed opening is counted and logged
    like any call, and the daemon keeps serving."""
    daemon = daemon_with(metrics={"address": "127.0.0.1:0"})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        stub = pb_grpc.SessionsStub(manager._channel)
        stream = stub.OpenSession(pb.OpenSessionRequest(object_id=LONG_OBJECT_ID), timeout=30)
        with pytest.raises(grpc.RpcError) as raised:
            next(stream)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND, raised.value.details()[:300]
        assert len(raised.value.details().encode()) <= 2000 and "(cut: " in raised.value.details()
        with pytest.raises(NotFoundError, match=r"\(cut: \d+ bytes\)"):
            manager.model(LONG_OBJECT_ID).acquire_session()
        with manager.acquire_one() as session:
            with pytest.raises(NotFoundError, match=r"\(cut: \d+ bytes\)") as step:
                session.from_movable(manager.model(LONG_OBJECT_ID))
            assert len(str(step.value).encode()) < 2500
            assert session.from_value(7).to_value() == 7, "the session goes on"
        with manager.acquire_one() as again:
            assert again.from_value(8).to_value() == 8, "the daemon keeps serving"
        text = scrape(daemon)
        labels = {"method": "OpenSession", "model": "", "protocol": "grpc"}
        assert sample(text, "deployd_calls_total", code="NOT_FOUND", **labels) == 2
        assert sample(text, "deployd_calls_total", code="OK", **labels) == 2
        assert sample(text, "deployd_calls_in_flight") == 0
    assert wait_until(lambda: sum("method=OpenSession " in line for line in list(daemon.lines)) >= 4, 10)


def test_a_streams_errors_go_through_the_one_wrapper() -> None:
    """call_handlers on an async generator (a stream), without a daemon: an error before the
    first message and one after it are both cut to MAX_MESSAGE_BYTES with their status; the
    stream is counted once (when its first message leaves, or when it fails before one), the
    calls-in-flight gauge is back to 0, and one line is logged per call with how it ended."""

    class Aborted(Exception):
        pass

    class Context:
        def __init__(self) -> None:
            self.aborted: tuple[grpc.StatusCode, str] | None = None
            self.done: list[Any] = []

        def set_trailing_metadata(self, metadata: Any) -> None:
            pass

        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            self.aborted = (code, details)
            raise Aborted

        def add_done_callback(self, callback: Any) -> None:
            self.done.append(callback)

        def invocation_metadata(self) -> tuple[()]:
            return ()

        def time_remaining(self) -> float | None:
            return None  # no deadline

    class Servicer:
        def __init__(self) -> None:
            self._metrics = Metrics()
            self._log_calls = True

        @call_handlers(lambda request: "")
        async def Stream(self, request: Any, context: Any) -> AsyncIterator[int]:
            if request == "at-open":
                raise NotFound(f"no object {LONG_OBJECT_ID!r}")
            yield 1
            raise NotFound(f"no object {LONG_OBJECT_ID!r}")

    def count(servicer: Servicer, code: str) -> float | None:
        labels = {"method": "Stream", "model": "", "code": code, "protocol": "grpc"}
        return servicer._metrics.registry.get_sample_value("deployd_calls_total", labels)

    async def drain(servicer: Servicer, request: str, context: Context) -> list[int]:
        got: list[int] = []
        with pytest.raises(Aborted):
            async for message in servicer.Stream(request, context):
                got.append(message)
        return got

    servicer = Servicer()
    for request, messages, counted in [("at-open", [], "NOT_FOUND"), ("later", [1], "OK")]:
        context = Context()
        assert asyncio.run(drain(servicer, request, context)) == messages
        assert context.aborted is not None
        code, details = context.aborted
        assert code == grpc.StatusCode.NOT_FOUND and len(details.encode()) <= MAX_MESSAGE_BYTES
        assert "(cut: " in details
        assert count(servicer, counted) == 1, request
        assert len(context.done) == 1, "one log line per call"
    assert count(servicer, "NOT_FOUND") == 1 and count(servicer, "OK") == 1
    assert servicer._metrics.registry.get_sample_value("deployd_calls_in_flight") == 0
