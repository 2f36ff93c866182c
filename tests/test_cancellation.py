"""Cooperative cancellation: model code asks whether its caller is gone (deployd_worker) and
stops early, and its worker lives on; what it is told belongs to its own call alone.

The daemon tests run real daemons on both paths (the daemon's, a data port's), and over
HTTP, with a grace long enough that a worker killed for its abandoned call would show; each
daemon's stop checks that no process or shared-memory segment is left behind.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

import deployd_worker
from client import DeadlineExceededError, InterpreterManager, ReplicatedObj
from deployd_worker._call import Call, running
from server import errors
from server.api.calls import status_for
from server.ipc import protocol
from server.ipc.cancel_board import CancelBoard, map_slot_word
from server.pool.deadlines import latest
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, wait_until
from tests.test_lifecycle import worker_pids

GRACE = 30.0  # pool.abandoned_call_grace_seconds: far longer than any wait below
DEADLINE = 0.5  # the caller's


# ---------------------------------------------------------------------------- the model's API


def test_outside_a_worker_there_is_no_call() -> None:
    assert deployd_worker.cancelled() is False
    assert deployd_worker.deadline() is None
    deployd_worker.check()  # nothing to raise


def test_a_deadline_cancels_once_it_passes() -> None:
    soon = time.monotonic_ns() + 200_000_000
    with running(Call(soon)):
        assert not deployd_worker.cancelled()
        deadline = deployd_worker.deadline()
        assert deadline is not None and abs(deadline - (time.time() + 0.2)) < 0.05
        assert wait_until(deployd_worker.cancelled, 5, interval=0.01)
        with pytest.raises(deployd_worker.Cancelled) as raised:
            deployd_worker.check()
        assert raised.value.deadline_passed
    assert not deployd_worker.cancelled() and deployd_worker.deadline() is None


def test_a_flag_cancels_its_own_call_and_never_the_next() -> None:
    board = CancelBoard(2)
    try:
        word = map_slot_word(board.name, 1)
        with running(Call(0, word, key=7)) as call:
            board.flag(0, 7)  # another slot's call of the same id: not this one
            assert not deployd_worker.cancelled()
            board.flag(1, 7)
            assert deployd_worker.cancelled()
            with pytest.raises(deployd_worker.Cancelled) as raised:
                deployd_worker.check()
            assert not raised.value.deadline_passed
            assert call.gone
        # The flag stays on the board; the next call (another id, as every request has) is not cancelled.
        with running(Call(0, word, key=8)):
            assert not deployd_worker.cancelled()
        word.release()
    finally:
        board.unlink()


def test_a_call_made_inside_another_puts_the_outer_one_back() -> None:
    outer = Call(time.monotonic_ns() + 60_000_000_000)
    with running(outer):
        with running(Call(time.monotonic_ns() - 1)):
            assert deployd_worker.cancelled()
        assert not deployd_worker.cancelled() and deployd_worker.deadline() == outer.deadline


ASKS = """
import deployd_worker


def ask():
    return deployd_worker.cancelled(), deployd_worker.deadline()
"""


def test_a_copy_interned_into_a_package_answers_as_the_workers(tmp_path: Path) -> None:
    """An exporter that interns deployd_worker (intern("**")) gets a copy of its own in the
    archive: it asks the worker's copy, which the worker tells of each call."""
    from torch.package import PackageExporter, PackageImporter

    archive = tmp_path / "asks.pt"
    with PackageExporter(str(archive)) as exporter:
        exporter.intern(["deployd_worker", "deployd_worker.**"])
        exporter.save_source_string("asks", ASKS)
    asks = PackageImporter(str(archive)).import_module("asks")
    assert asks.deployd_worker is not deployd_worker  # the archive's own copy
    assert asks.ask() == (False, None)
    call = Call(time.monotonic_ns() - 1)
    with running(call):
        assert asks.ask() == (True, call.deadline)


def test_a_batch_carries_its_callers_latest_deadline() -> None:
    assert latest([5, 9, 7]) == 9
    assert latest([5, 0]) == 0  # a caller without a deadline: the batch has none
    assert latest([]) == 0


@pytest.mark.parametrize(
    ("kind", "error", "code"),
    [
        (protocol.FAILURE_DEADLINE_EXCEEDED, errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
        (protocol.FAILURE_CANCELLED, errors.CallCancelled, grpc.StatusCode.CANCELLED),
    ],
)
def test_a_model_that_stops_early_is_answered_as_its_caller_left(kind: str, error: type, code: Any) -> None:
    from server.worker.runtime import Runtime

    class Stops:
        def run(self) -> None:
            deployd_worker.check()

    runtime = Runtime()
    runtime._objects["stops"] = Stops()
    deadline = time.monotonic_ns() - 1 if kind == protocol.FAILURE_DEADLINE_EXCEEDED else 0
    call = Call(deadline)
    call.gone = True
    with running(call):
        reply, _ = runtime.handle(protocol.Invoke("stops", "run", [], {}), [])
    assert isinstance(reply, protocol.Failure) and reply.kind == kind
    domain = errors.error_from_failure(reply)
    assert type(domain) is error and status_for(domain) == code


# ---------------------------------------------------------------------------- real daemons


@pytest.fixture
def one_worker(package_dir: Path, tmp_path: Path) -> Iterator[Callable[[int], DaemonProcess]]:
    """one_worker(data_ports): a daemon of one worker, whose abandoned calls get GRACE seconds."""
    started: list[DaemonProcess] = []

    def start(data_ports: int) -> DaemonProcess:
        pool = {"workers": 1, "data_ports": data_ports, "abandoned_call_grace_seconds": GRACE}
        config = write_config(tmp_path / f"config-{len(started)}.yaml", package_dir, pool=pool)
        started.append(DaemonProcess(config).start())
        return started[-1]

    yield start
    for process in started:
        process.assert_clean_stop()


def load_patient(manager: InterpreterManager, package_dir: Path) -> ReplicatedObj:
    return manager.load_package(package_dir / "models.pt").load_pickle("models", "patient.pkl")


@pytest.mark.parametrize("data_ports", [-1, 0], ids=["daemon-path", "direct"])
def test_a_model_that_asks_stops_at_the_deadline_and_keeps_its_worker(
    one_worker: Callable[[int], DaemonProcess], package_dir: Path, data_ports: int
) -> None:
    with InterpreterManager(one_worker(data_ports).target, timeout=60) as manager:
        patient = load_patient(manager, package_dir)
        seen = patient.options(timeout=5).call_method("now")
        assert not seen["cancelled"]
        assert seen["deadline"] is not None and abs(seen["deadline"] - (time.time() + 5)) < 1.0
        before = worker_pids(manager)
        called = time.time()
        with pytest.raises(DeadlineExceededError):
            patient.options(timeout=DEADLINE).call_method("until_cancelled", GRACE)
        # Waits for the worker, which is free again once the model has stopped.
        last = patient.options(timeout=10).call_method("last_call")
        answered = time.time() - called
        assert last is not None and last["cancelled"], last
        assert last["ran"] < DEADLINE + 1.5 and answered < DEADLINE + 3, (last, answered)
        # The caller's deadline, as the server took it: later by the request's way there, no more.
        assert last["deadline"] is not None and -0.05 < last["deadline"] - (called + DEADLINE) < 0.3, (last, called)
        assert worker_pids(manager) == before == {last["pid"]}
        assert sum(worker.restarts for worker in manager.status().workers) == 0
        # The next call is not told of the last one's caller.
        assert not patient.call_method("now")["cancelled"]


def test_a_caller_that_cancels_without_a_deadline_stops_the_model(
    one_worker: Callable[[int], DaemonProcess], package_dir: Path
) -> None:
    """No deadline to watch: only the daemon's flag on the cancel board can tell the worker."""
    from client._values import to_wire
    from deployd_wire.proto import deployd_pb2 as pb
    from deployd_wire.proto import deployd_pb2_grpc as pb_grpc

    daemon = one_worker(-1)
    with InterpreterManager(daemon.target, timeout=60) as manager:
        patient = load_patient(manager, package_dir)
        before = worker_pids(manager)
        request = pb.InvokeRequest(object_id=patient.id, method="until_cancelled")
        to_wire(GRACE, request.args.add())
        with grpc.insecure_channel(daemon.target) as channel:
            call = pb_grpc.DeploydStub(channel).Invoke.future(request)
            assert wait_until(lambda: any(w.state == "busy" for w in manager.status().workers), 10)
            cancelled_at = time.time()
            call.cancel()
            last = patient.options(timeout=10).call_method("last_call")
        assert last is not None and last["cancelled"] and last["deadline"] is None, last
        assert time.time() - cancelled_at < 3
        assert worker_pids(manager) == before
        assert sum(worker.restarts for worker in manager.status().workers) == 0


def test_an_http_caller_that_hangs_up_stops_the_model(package_dir: Path, tmp_path: Path) -> None:
    """KServe v2 over HTTP has no deadline: a caller that hangs up is seen through the cancel
    board alone (aiohttp cancels the call's handler, the daemon flags its request)."""
    config = write_config(
        tmp_path / "config.yaml",
        package_dir,
        pool={"workers": 1, "abandoned_call_grace_seconds": GRACE},
        server={"http_address": "127.0.0.1:0"},
    )
    settings = yaml.safe_load(config.read_text())
    settings["models"] = [{"name": "patient", "package": "models.pt", "pickle": "models:patient.pkl"}]
    config.write_text(yaml.safe_dump(settings))
    daemon = DaemonProcess(config).start()
    try:
        with InterpreterManager(daemon.target, timeout=60) as manager:
            before = worker_pids(manager)
            body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]})
            connection = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=DEADLINE)
            connection.request("POST", "/v2/models/patient/infer", body, {"Content-Type": "application/json"})
            with pytest.raises(socket.timeout):
                connection.getresponse()
            hung_up_at = time.time()
            connection.close()
            last = manager.model("patient").options(timeout=10).call_method("last_call")
            assert last is not None and last["cancelled"] and last["deadline"] is None, last
            assert time.time() - hung_up_at < 3
            assert worker_pids(manager) == before
            assert sum(worker.restarts for worker in manager.status().workers) == 0
    finally:
        daemon.assert_clean_stop()
