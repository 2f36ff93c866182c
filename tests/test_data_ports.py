"""Workers that serve calls themselves (pool.data_ports): Endpoints, deployd.v1 and KServe v2 on
a worker's own port, the same answers and errors as the daemon path, auth, replacement on the
same port, hot swap with no failed call, hung calls reclaimed, and a drain on SIGTERM.

Raw gRPC stubs against the ports the daemon advertises: what any gRPC client can do.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as v2  # the v2 messages as Triton's client has them
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from client import InterpreterManager
from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, wait_until

GENERATION_KEY = "deployd-endpoints-generation"


@pytest.fixture
def daemon_with(package_dir: Path, tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(**sections: Any) -> DaemonProcess:
        sections.setdefault("pool", {}).setdefault("data_ports", 0)
        config = write_config(tmp_path / f"config-{len(started)}.yaml", package_dir, **sections)
        started.append(DaemonProcess(config).start())
        return started[-1]

    yield start
    for process in started:
        process.assert_clean_stop()


def endpoints(target: str, metadata: tuple[tuple[str, str], ...] = ()) -> pb.EndpointsResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.DeploydStub(channel).Endpoints(pb.EndpointsRequest(), timeout=30, metadata=metadata)


def tensor_value(tensor: torch.Tensor) -> pb.Value:
    return pb.Value(
        tensor_value=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(tensor.shape), data=tensor.numpy().tobytes())
    )


def tensor_of(value: pb.Value) -> torch.Tensor:
    wire = value.tensor_value
    return torch.frombuffer(bytearray(wire.data), dtype=torch.float32).reshape(list(wire.shape))


def invoke(
    address: str, target: str, *args: pb.Value, method: str = "", metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[pb.InvokeResponse, dict[str, str]]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DeploydStub(channel)
        response, call = stub.Invoke.with_call(
            pb.InvokeRequest(object_id=target, method=method, args=list(args)), timeout=30, metadata=metadata
        )
        return response, dict(call.trailing_metadata() or ())


def without_call_id(message: str) -> str:
    """A model error's message less the id of its call (each call has its own)."""
    return re.sub(r" \(call id \w+: the whole traceback is in the daemon's log\)$", "", message)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_endpoints_and_direct_calls_answer_as_the_daemon(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    daemon = daemon_with()
    with InterpreterManager(daemon.target, timeout=60) as manager:
        package = manager.load_package(package_dir / "models.pt")
        scale = package.load_pickle("models", "scale.pkl", name="scale")
        answer = endpoints(daemon.target)
        pids = {worker.pid for worker in manager.status().workers}
        assert {worker.pid for worker in answer.workers} == pids
        assert len({worker.address for worker in answer.workers}) == 2
        assert all(worker.address.startswith("127.0.0.1:") for worker in answer.workers)
        assert "scale" in answer.workers[0].models and scale.object_id in answer.workers[0].models
        x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        for worker in answer.workers:
            response, trailers = invoke(worker.address, "scale", tensor_value(x))
            assert torch.equal(tensor_of(response.result), x * 2)
            assert int(trailers[GENERATION_KEY]) == answer.generation
            response, _ = invoke(worker.address, scale.object_id, tensor_value(x))
            assert torch.equal(tensor_of(response.result), x * 2)
            response, _ = invoke(worker.address, "scale", method="pid")
            assert response.result.int_value == worker.pid
        # Errors: the daemon path's status and message, word for word.
        address = answer.workers[0].address
        bad_calls: list[pb.InvokeRequest] = [
            pb.InvokeRequest(object_id="nope"),
            pb.InvokeRequest(object_id="scale", version=99),
            pb.InvokeRequest(object_id="scale", method="no_such_method"),
            pb.InvokeRequest(object_id="scale", method="fail", args=[pb.Value(string_value="boom")]),
            pb.InvokeRequest(
                object_id="scale", args=[pb.Value(tensor_value=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], data=b"x"))]
            ),
            pb.InvokeRequest(object_id=scale.object_id, version=1),
        ]
        with grpc.insecure_channel(daemon.target) as to_daemon, grpc.insecure_channel(address) as to_worker:
            for request in bad_calls:
                by_daemon = rpc_error(lambda r=request: pb_grpc.DeploydStub(to_daemon).Invoke(r, timeout=30))
                direct = rpc_error(lambda r=request: pb_grpc.DeploydStub(to_worker).Invoke(r, timeout=30))
                assert direct.code() == by_daemon.code(), request
                assert without_call_id(direct.details()) == without_call_id(by_daemon.details()), request
                if request.method == "fail":
                    # The worker, as the daemon would, logs the model's whole traceback under the id.
                    call_id = dict(direct.trailing_metadata())["x-request-id"]
                    assert f"call id {call_id}: the whole traceback" in direct.details()
                    assert wait_until(lambda i=call_id: f"call id {i}: Invoke 'scale' raised" in daemon.log, 10)
            # What only the daemon does is not served on a data port.
            unimplemented = rpc_error(lambda: pb_grpc.DeploydStub(to_worker).Status(pb.StatusRequest(), timeout=30))
            assert unimplemented.code() == grpc.StatusCode.UNIMPLEMENTED
            present = pb_grpc.DeploydStub(to_worker).HasAttr(pb.HasAttrRequest(object_id="scale", name="nap"))
            assert present.present


def test_kserve_v2_on_a_data_port(daemon_with: Callable[..., DaemonProcess], package_dir: Path) -> None:
    daemon = daemon_with()
    with InterpreterManager(daemon.target, timeout=60) as manager:
        manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
    address = endpoints(daemon.target).workers[1].address
    request = v2.ModelInferRequest(model_name="scale", id="r1")
    request.inputs.add(name="x", datatype="FP32", shape=[4]).contents.fp32_contents.extend([1, 2, 3, 4])
    with grpc.insecure_channel(address) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(v2.ModelReadyRequest(name="scale"), timeout=30).ready
        assert not stub.ModelReady(v2.ModelReadyRequest(name="other"), timeout=30).ready
        assert stub.ModelMetadata(v2.ModelMetadataRequest(name="scale"), timeout=30).versions == ["1"]
        response = stub.ModelInfer(request, timeout=30)
        assert response.model_version == "1" and response.id == "r1"
        assert list(response.outputs[0].contents.fp32_contents) == [2, 4, 6, 8]
        missing = rpc_error(lambda: stub.ModelInfer(v2.ModelInferRequest(model_name="other"), timeout=30))
        assert missing.code() == grpc.StatusCode.NOT_FOUND
        load = v2.RepositoryModelLoadRequest(model_name="scale")
        refused = rpc_error(lambda: stub.RepositoryModelLoad(load, timeout=30))
        assert refused.code() == grpc.StatusCode.UNIMPLEMENTED
    # Triton's own client, pointed at a worker.
    client = triton.InferenceServerClient(url=address)
    try:
        assert client.is_model_ready("scale")
        infer_input = triton.InferInput("x", [2, 2], "FP32")
        infer_input.set_data_from_numpy(np.array([[1, 2], [3, 4]], dtype=np.float32))
        result = client.infer("scale", [infer_input])
        assert result.as_numpy(result.get_response().outputs[0].name).tolist() == [[2, 4], [6, 8]]
    finally:
        client.close()


def test_tokens_guard_data_ports(daemon_with: Callable[..., DaemonProcess], package_dir: Path) -> None:
    daemon = daemon_with(auth={"admin_tokens": ["admin-secret"], "invoke_tokens": ["invoke-secret"]})
    with InterpreterManager(daemon.target, timeout=60, token="admin-secret") as manager:
        manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
    answer = endpoints(daemon.target, (("authorization", "Bearer invoke-secret"),))
    address = answer.workers[0].address
    x = tensor_value(torch.ones(2))
    assert rpc_error(lambda: invoke(address, "scale", x)).code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer wrong"),)
    assert rpc_error(lambda: invoke(address, "scale", x, metadata=wrong)).code() == grpc.StatusCode.UNAUTHENTICATED
    response, _ = invoke(address, "scale", x, metadata=(("authorization", "Bearer invoke-secret"),))
    assert tensor_of(response.result).tolist() == [2.0, 2.0]


def test_a_replacement_serves_on_its_slots_port(daemon_with: Callable[..., DaemonProcess], package_dir: Path) -> None:
    daemon = daemon_with()
    with InterpreterManager(daemon.target, timeout=60) as manager:
        manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
        before = endpoints(daemon.target)
        victim = before.workers[0]
        os.kill(victim.pid, signal.SIGKILL)

        def replaced() -> bool:
            now = endpoints(daemon.target)
            return len(now.workers) == 2 and victim.pid not in {worker.pid for worker in now.workers}

        assert wait_until(replaced, 60)
        after = endpoints(daemon.target)
        assert after.generation > before.generation
        again = next(worker for worker in after.workers if worker.slot == victim.slot)
        assert again.address == victim.address and again.generation == victim.generation + 1
        # Its objects were replayed before the port took calls.
        response, _ = invoke(again.address, "scale", method="pid")
        assert response.result.int_value == again.pid


def test_hot_swap_on_data_ports_fails_no_call(daemon_with: Callable[..., DaemonProcess], package_dir: Path) -> None:
    daemon = daemon_with()
    x = torch.ones(4)
    with InterpreterManager(daemon.target, timeout=60) as manager:
        package = manager.load_package(package_dir / "models.pt")
        package.load_pickle("models", "echo.pkl", name="swap")  # version 1: x
        addresses = [worker.address for worker in endpoints(daemon.target).workers]
        failures: list[str] = []
        swapped = threading.Event()
        stale_after_swap: list[float] = []
        stop = threading.Event()

        def caller(address: str) -> None:
            with grpc.insecure_channel(address) as channel:
                stub = pb_grpc.DeploydStub(channel)
                deadline = time.monotonic() + 60
                while not stop.is_set() and time.monotonic() < deadline:
                    was_swapped = swapped.is_set()
                    try:
                        response = stub.Invoke(pb.InvokeRequest(object_id="swap", args=[tensor_value(x)]), timeout=30)
                    except grpc.RpcError as error:
                        failures.append(f"{error.code()}: {error.details()}")
                        continue
                    if was_swapped:
                        stale_after_swap.append(float(tensor_of(response.result)[0]))

        threads = [threading.Thread(target=caller, args=(addresses[i % 2],)) for i in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        for _ in range(3):
            package.load_pickle("models", "scale.pkl", name="swap")  # x * 2
            package.load_pickle("models", "echo.pkl", name="swap")
        package.load_pickle("models", "scale.pkl", name="swap")
        swapped.set()
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not failures, failures[:5]
    assert stale_after_swap and set(stale_after_swap) == {2.0}


def test_a_hung_call_on_a_data_port_is_reclaimed(daemon_with: Callable[..., DaemonProcess], package_dir: Path) -> None:
    daemon = daemon_with(pool={"max_call_seconds": 1.0})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
        worker = endpoints(daemon.target).workers[0]
        started = time.monotonic()
        error = rpc_error(lambda: invoke(worker.address, "scale", pb.Value(double_value=30), method="nap"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 15
        assert wait_until(lambda: "ran over pool.max_call_seconds" in daemon.log, 10), daemon.log


def test_sigterm_drains_calls_on_data_ports(daemon_with: Callable[..., DaemonProcess], package_dir: Path) -> None:
    daemon = daemon_with()
    with InterpreterManager(daemon.target, timeout=60) as manager:
        manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
    address = endpoints(daemon.target).workers[0].address
    outcome: list[Any] = []

    def slow_call() -> None:
        try:
            outcome.append(invoke(address, "scale", pb.Value(double_value=1.5), method="nap")[0])
        except grpc.RpcError as error:
            outcome.append(error)

    thread = threading.Thread(target=slow_call)
    thread.start()
    time.sleep(0.5)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    thread.join(30)
    assert daemon.process.wait(30) == 0
    assert outcome and isinstance(outcome[0], pb.InvokeResponse), outcome


# ---------------------------------------------------------------------------- our clients


def invoke_lines(daemon: DaemonProcess) -> tuple[int, int]:
    """Invoke calls logged (deployd.calls): (through the daemon, on a data port: tagged worker=)."""
    lines = [line for line in list(daemon.lines) if "deployd.calls" in line and "method=Invoke " in line]
    direct = sum(1 for line in lines if " worker=" in line)
    return len(lines) - direct, direct


def served(manager: InterpreterManager) -> int:
    return sum(worker.calls_served for worker in manager.status().workers)


def wait_for_lines(daemon: DaemonProcess, through_daemon: int, direct: int) -> None:
    """The call lines are written after the answers (by a thread): wait for the counts."""
    assert wait_until(lambda: invoke_lines(daemon) == (through_daemon, direct), 10), invoke_lines(daemon)


def test_the_client_calls_workers_directly(daemon_with: Callable[..., DaemonProcess], package_dir: Path) -> None:
    daemon = daemon_with()
    with InterpreterManager(daemon.target, timeout=60) as manager:
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
        before = served(manager)
        pids = {scale.call_method("pid") for _ in range(20)}
        assert torch.equal(scale(torch.ones(3)), torch.full((3,), 2.0))
        assert scale.hasattr("nap") and not scale.hasattr("nothing_here")
        assert pids == {worker.pid for worker in manager.status().workers}  # both workers, in turn
        wait_for_lines(daemon, 0, 21)  # none of them went through the daemon
        assert served(manager) == before + 21 + 2  # Status counts the calls served on the ports too
    with InterpreterManager(daemon.target, timeout=60, direct=False) as manager:
        manager.model("scale")(torch.ones(3))
        wait_for_lines(daemon, 1, 21)


def test_a_client_that_cannot_reach_the_ports_uses_the_daemon(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The ports listen on 127.0.0.1; told to dial 127.0.0.254, the client is refused (as from
    # outside a container that publishes only the daemon's port).
    daemon = daemon_with(server={"advertise_host": "127.0.0.254"})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
        for _ in range(5):
            assert torch.equal(scale(torch.ones(2)), torch.full((2,), 2.0))
        wait_for_lines(daemon, 5, 0)
    warnings = [record for record in caplog.records if "cannot be reached" in record.getMessage()]
    assert len(warnings) == 1


def test_direct_calls_survive_killed_workers(daemon_with: Callable[..., DaemonProcess], package_dir: Path) -> None:
    from client import Retry

    daemon = daemon_with()
    with InterpreterManager(daemon.target, timeout=60, retry=Retry(attempts=5)) as manager:
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
        failures: list[BaseException] = []
        answered = [0]
        stop = threading.Event()

        def caller() -> None:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    scale.call_method("tagged_double", torch.ones(2))
                    answered[0] += 1
                except Exception as error:
                    failures.append(error)

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for thread in threads:
            thread.start()
        for _ in range(2):
            time.sleep(1.0)
            os.kill(next(iter(endpoints(daemon.target).workers)).pid, signal.SIGKILL)
        time.sleep(2.0)
        stop.set()
        for thread in threads:
            thread.join(60)
        assert not failures, failures[:3]
        assert answered[0] > 20


def test_models_that_batch_are_called_through_the_daemon_and_batch_on_a_port_too(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    """A batched model's calls batch in the daemon's one line (a worker sees only the calls that
    reach it between two runs): Endpoints leaves it out, and our client sends it through the
    daemon. Called on a port all the same, the port batches what meets there, each caller
    getting its own rows; and a swap drains a port's batches first."""
    from client import Batching

    daemon = daemon_with()
    with InterpreterManager(daemon.target, timeout=60) as manager:
        package = manager.load_package(package_dir / "models.pt")
        probe = package.load_pickle(
            "models", "batch_probe.pkl", name="probe", batching=Batching(max_batch_size=16, max_queue_delay_ms=5)
        )
        manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
        answer = endpoints(daemon.target)
        assert "scale" in answer.workers[0].models and "probe" not in answer.workers[0].models
        largest: list[int] = []
        failures: list[BaseException] = []

        def caller(index: int) -> None:
            for call in range(15):
                x = torch.full((1, 3), float(index * 100 + call))
                try:
                    y, rows = probe(x)
                except Exception as error:
                    failures.append(error)
                    continue
                if not torch.equal(y, x * 2):
                    failures.append(AssertionError(f"caller {index} got {y} for {x}"))
                largest.append(int(rows[0]))

        threads = [threading.Thread(target=caller, args=(index,)) for index in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not failures, failures[:3]
        assert len(largest) == 12 * 15 and max(largest) > 1  # batched, in the daemon's line
        wait_for_lines(daemon, 12 * 15, 0)

        # Straight to one port: each of 24 concurrent callers gets its own rows back.
        async def on_the_port() -> list[Any]:
            async with grpc.aio.insecure_channel(answer.workers[0].address) as channel:
                stub = pb_grpc.DeploydStub(channel)
                requests = [
                    pb.InvokeRequest(object_id="probe", args=[tensor_value(torch.full((1, 2), float(i)))])
                    for i in range(24)
                ]
                return list(await asyncio.gather(*(stub.Invoke(request, timeout=60) for request in requests)))

        answers = asyncio.run(on_the_port())
        for i, response in enumerate(answers):
            y = tensor_of(response.result.tuple_value.items[0])
            assert torch.equal(y, torch.full((1, 2), 2.0 * i)), (i, y)
        wait_for_lines(daemon, 12 * 15, 24)
        # A swap of a batched model drains its batches first: it fails no call.
        package.load_pickle("models", "batch_probe.pkl", name="probe", batching=Batching(max_batch_size=4))
        y, _ = probe(torch.ones(1, 3))
        assert torch.equal(y, torch.full((1, 3), 2.0))


def test_the_asyncio_client_calls_workers_directly(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    import asyncio

    from client.aio import AsyncInterpreterManager

    daemon = daemon_with()
    with InterpreterManager(daemon.target, timeout=60) as manager:
        manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
        pids = {worker.pid for worker in manager.status().workers}

    async def calls() -> tuple[set[int], list[Any]]:
        async with AsyncInterpreterManager(daemon.target, timeout=60) as aio_manager:
            model = aio_manager.model("scale")
            seen = set(await asyncio.gather(*(model.call_method("pid") for _ in range(16))))
            answers = await asyncio.gather(*(model(torch.full((2,), float(i))) for i in range(32)))
            return seen, answers

    seen, answers = asyncio.run(calls())
    assert seen == pids
    assert all(torch.equal(answer, torch.full((2,), 2.0 * i)) for i, answer in enumerate(answers))
    wait_for_lines(daemon, 0, 16 + 32)


def test_a_call_that_kills_its_worker_is_not_sent_again(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    """On the direct path the client cannot see why a worker's connection dropped; the daemon
    can (the call board names the call it ran): a poison call kills one worker, not one per try,
    while a worker killed from outside is retried away (test_direct_calls_survive_killed_workers)."""
    from client import Retry, UnavailableError

    daemon = daemon_with()
    with InterpreterManager(daemon.target, timeout=60, retry=Retry(attempts=5)) as manager:
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
        scale.call_method("pid")
        before = {worker.pid for worker in endpoints(daemon.target).workers}
        with pytest.raises(UnavailableError) as caught:
            scale.call_method("segfault")
        assert caught.value.call_killed_worker
        assert "was killed by signal SIGSEGV while serving this call" in caught.value.details
        time.sleep(1.0)
        exits = endpoints(daemon.target).exits
        assert len([gone for gone in exits if gone.pid in before]) == 1, exits  # one worker, not five
        assert exits[-1].call_killed_worker and exits[-1].call_id
        assert scale.call_method("pid") > 0  # and the pool serves on


def test_a_swapped_or_unloaded_name_is_refused_as_the_daemon_refuses_it(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    from client import NotFoundError

    daemon = daemon_with()
    with InterpreterManager(daemon.target, timeout=60) as manager:
        package = manager.load_package(package_dir / "models.pt")
        first = package.load_pickle("models", "echo.pkl", name="gone")
        package.load_pickle("models", "scale.pkl", name="gone")
        with pytest.raises(NotFoundError, match="model 'gone' has no version 1"):
            manager.model("gone", version=1)(1.0)
        with pytest.raises(NotFoundError, match=f"no object '{first.object_id}' is loaded"):
            manager.model(first.object_id)(1.0)
        manager.model("gone").unload()
        with pytest.raises(NotFoundError, match="no model 'gone' is loaded"):
            manager.model("gone")(1.0)
        # A name the workers know is refused by them; an object id gone is not on the list any
        # more, so the daemon refuses it: the same words either way. The name unloaded is refused
        # by a worker, then (the list of ports being older than the unload) by the daemon.
        wait_for_lines(daemon, 2, 2)


def test_data_ports_serve_the_daemons_tls(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path, tmp_path: Path
) -> None:
    from client import TLS, UnavailableError
    from tests.test_operations import make_certificates

    certs = make_certificates(tmp_path)
    tls = {
        "cert_file": str(certs["server.pem"]),
        "key_file": str(certs["server.key"]),
        "client_ca_file": str(certs["ca.pem"]),
    }
    daemon = daemon_with(tls=tls)
    mutual = TLS(ca=certs["ca.pem"], cert=certs["client.pem"], key=certs["client.key"])
    with InterpreterManager(daemon.target, timeout=60, tls=mutual) as manager:
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
        for _ in range(4):
            assert torch.equal(scale(torch.ones(1)), torch.full((1,), 2.0))
        wait_for_lines(daemon, 0, 4)  # over TLS, straight to the workers
        address = manager._routes.workers[0].address
    x = tensor_value(torch.ones(1))
    assert rpc_error(lambda: invoke(address, "scale", x)).code() == grpc.StatusCode.UNAVAILABLE  # plaintext
    no_certificate = TLS(ca=certs["ca.pem"])
    credentials = no_certificate.channel_credentials()
    with grpc.secure_channel(address, credentials) as channel:
        stub = pb_grpc.DeploydStub(channel)
        refused = rpc_error(lambda: stub.Invoke(pb.InvokeRequest(object_id="scale", args=[x]), timeout=10))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
    anonymous = InterpreterManager(daemon.target, timeout=5, tls=no_certificate)
    with anonymous, pytest.raises(UnavailableError):
        anonymous.model("scale")(torch.ones(1))
