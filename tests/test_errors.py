"""Bad input gets a precise status and a clear message, and the daemon keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
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
from client._errors import translate_rpc_error
from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc
from server import errors
from server.api.calls import register_service
from server.api.deployd_v1 import InvokeHandlers
from server.api.metrics import Metrics
from server.api.values import DEFAULT_LIMITS


def assert_still_serving(manager: InterpreterManager, package_dir: Path) -> None:
    model = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
    assert torch.equal(model(torch.ones(2)), torch.full((2,), 2.0))


def test_exception_in_model_code(manager: InterpreterManager, package_dir: Path) -> None:
    scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
    with pytest.raises(RemoteError) as raised:
        scale.call_method("fail", "the model says no")
    error = raised.value
    assert error.code == grpc.StatusCode.UNKNOWN
    assert error.remote_type == "ValueError"
    assert "the model says no" in error.details
    assert "in fail" in error.remote_traceback and "raise ValueError(message)" in error.remote_traceback
    assert "Remote traceback" in str(error)
    assert_still_serving(manager, package_dir)


def test_result_that_cannot_be_sent(manager: InterpreterManager, package_dir: Path) -> None:
    scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
    with pytest.raises(RemoteError, match="cannot be sent") as raised:
        scale.call_method("unsendable")
    assert raised.value.remote_type == "TypeError"
    assert_still_serving(manager, package_dir)


def test_file_that_is_not_a_package(manager: InterpreterManager, package_dir: Path) -> None:
    packages_before = len(manager.status().packages)
    with pytest.raises(InvalidArgumentError, match=r"not a loadable torch\.package archive") as raised:
        manager.load_package(package_dir / "not_a_package.pt")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(manager.status().packages) == packages_before
    with pytest.raises(InvalidArgumentError):
        manager.load_package(b"")
    assert_still_serving(manager, package_dir)


@pytest.mark.parametrize(("module", "file"), [("no_such_module", "model.pkl"), ("model", "no_such.pkl")])
def test_wrong_module_or_pickle_name(manager: InterpreterManager, package_dir: Path, module: str, file: str) -> None:
    package = manager.load_package(package_dir / "conv.pt")
    objects_before = len(manager.status().objects)
    with pytest.raises(InvalidArgumentError, match="cannot load pickle") as raised:
        package.load_pickle(module, file)
    assert raised.value.remote_type  # the worker's exception type is named
    assert len(manager.status().objects) == objects_before, "a failed load leaves no object behind"
    assert_still_serving(manager, package_dir)


def test_missing_resource(manager: InterpreterManager, package_dir: Path) -> None:
    package = manager.load_package(package_dir / "models.pt")
    with pytest.raises(InvalidArgumentError):
        package.load_text("models", "no_such.txt")
    assert_still_serving(manager, package_dir)


def test_unknown_package_and_object_ids(manager: InterpreterManager, package_dir: Path) -> None:
    stub = pb_grpc.DeploydStub(manager._channel)
    for call, request in [
        (stub.LoadPickle, pb.LoadPickleRequest(package_id="nope", module="m", file="f")),
        (stub.Invoke, pb.InvokeRequest(object_id="obj-nope")),
        (stub.HasAttr, pb.HasAttrRequest(object_id="obj-nope", name="x")),
        (stub.UnloadObject, pb.UnloadObjectRequest(object_id="obj-nope")),
        (stub.UnloadPackage, pb.UnloadPackageRequest(package_id="nope")),
        (stub.LoadText, pb.LoadResourceRequest(package_id="nope", module="m", resource="r")),
    ]:
        with pytest.raises(NotFoundError, match="nope"):
            manager.call(call, request)
    assert_still_serving(manager, package_dir)


def test_server_paths(manager: InterpreterManager, package_dir: Path) -> None:
    assert manager.load_package(server_path="conv.pt").id
    with pytest.raises(PermissionDeniedError, match="outside the package directory"):
        manager.load_package(server_path="../../../etc/passwd")
    with pytest.raises(PermissionDeniedError):
        manager.load_package(server_path="/etc/passwd")
    with pytest.raises(NotFoundError):
        manager.load_package(server_path="no_such_package.pt")
    assert_still_serving(manager, package_dir)


def test_malformed_values(manager: InterpreterManager, package_dir: Path) -> None:
    echo = manager.load_package(package_dir / "models.pt").load_pickle("models", "echo.pkl")
    stub = pb_grpc.DeploydStub(manager._channel)
    short = pb.Value(tensor_value=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], data=b"\x00" * 15))
    unknown_dtype = pb.Value(tensor_value=pb.Tensor(dtype=99, shape=[1], data=b"\x00"))  # type: ignore[arg-type]
    negative = pb.Value(tensor_value=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[-1], data=b""))
    for bad, message in [
        (short, "needs 16 bytes"),
        (unknown_dtype, "unknown tensor dtype"),
        (negative, "negative size"),
        (pb.Value(), "no kind set"),
        (pb.Value(dict_value=pb.Dict(entries=[pb.DictEntry(value=pb.Value(int_value=1))])), "no key set"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message):
            manager.call(stub.Invoke, pb.InvokeRequest(object_id=echo.id, args=[bad]))
    with pytest.raises(InvalidArgumentError, match="cannot be sent"):
        echo(object())
    with pytest.raises(InvalidArgumentError, match="int64"):
        echo(2**64)
    assert_still_serving(manager, package_dir)


def test_bad_module_source(manager: InterpreterManager, package_dir: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="SyntaxError"):
        manager.register_module_source("deployd_broken", "def broken(:\n")
    with pytest.raises(InvalidArgumentError, match="ZeroDivisionError"):
        manager.register_module_source("deployd_raises", "1 / 0\n")
    with pytest.raises(InvalidArgumentError, match="not a valid module name"):
        manager.register_module_source("not a name", "")
    assert "deployd_broken" not in manager.status().modules
    assert_still_serving(manager, package_dir)


class _Raising:
    """The models as the Invoke handler sees them (ModelCalls): every call raises one error."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def invoke(self, *args: Any) -> tuple[Any, list[Any]]:
        raise self.error


class _InvokeOnly(InvokeHandlers, pb_grpc.DeploydServicer):
    """The daemon's own Invoke handler (and its error wrapper) over models that raise."""

    def __init__(self, service: Any) -> None:
        self._service = service
        self._metrics = Metrics()
        self._log_calls = False
        self._value_limits = DEFAULT_LIMITS


@contextlib.contextmanager
def invoke_served(service: Any) -> Iterator[str]:
    """A grpc.aio server in a thread of its own, serving _InvokeOnly as the daemon registers it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servicer = _InvokeOnly(service)

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        service_descriptor = pb.DESCRIPTOR.services_by_name["Deployd"]
        adds = pb_grpc.add_DeploydServicer_to_server
        register_service(server, servicer, adds, service_descriptor, servicer._metrics, only=frozenset({"Invoke"}))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


# Each domain error of the daemon (server.errors), as the caller meets it: its status, the client's
# exception for it, and what that exception carries. Through the real handler, wire and client.
_TRAVELS = [
    (errors.ObjectNotFound("obj-gone"), grpc.StatusCode.NOT_FOUND, NotFoundError, "no object 'obj-gone' is loaded"),
    (errors.InvalidValue("not a tensor"), grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError, "not a tensor"),
    (errors.PathNotAllowed("outside"), grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError, "outside"),
    (errors.TooLarge("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError, "too big"),
    (errors.Overloaded("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError, "queue full"),
    (
        errors.SessionEnded("s1", "closed"),
        grpc.StatusCode.FAILED_PRECONDITION,
        FailedPreconditionError,
        "session 's1' has ended: closed",
    ),
    (
        errors.WorkerCrashed("worker 1 died", caused_by_call=True),
        grpc.StatusCode.UNAVAILABLE,
        UnavailableError,
        "worker 1 died",
    ),
    (errors.PoolClosed(), grpc.StatusCode.UNAVAILABLE, UnavailableError, "the daemon is shutting down"),
    (
        errors.ModelError("ValueError: no", remote_type="ValueError", remote_traceback="Traceback ...\nValueError: no"),
        grpc.StatusCode.UNKNOWN,
        RemoteError,
        "ValueError: no",
    ),
    (errors.DeploydError("unnamed"), grpc.StatusCode.INTERNAL, DeployError, "unnamed"),
    (RuntimeError("a bug"), grpc.StatusCode.INTERNAL, DeployError, "internal error: RuntimeError: a bug"),
]


@pytest.mark.parametrize(
    ("error", "code", "client_error", "details"), _TRAVELS, ids=[type(error).__name__ for error, *_ in _TRAVELS]
)
def test_each_daemon_error_reaches_the_caller_as_its_status_and_client_error(
    error: Exception, code: grpc.StatusCode, client_error: type[DeployError], details: str
) -> None:
    with (
        invoke_served(_Raising(error)) as target,
        grpc.insecure_channel(target) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        pb_grpc.DeploydStub(channel).Invoke(pb.InvokeRequest(object_id="obj-1"), timeout=30)
    assert raised.value.code() == code  # type: ignore[attr-defined]
    translated = translate_rpc_error(raised.value)
    assert type(translated) is client_error and isinstance(translated, DeployError)
    if getattr(error, "remote_traceback", ""):
        # A model's error names the call id its whole traceback is logged under.
        assert translated.call_id, "x-request-id came back"
        details += f" (call id {translated.call_id}: the whole traceback is in the daemon's log)"
    assert (translated.code, translated.details) == (code, details)
    assert translated.remote_type == getattr(error, "remote_type", "")
    assert translated.remote_traceback == getattr(error, "remote_traceback", "")
    # A call that ended its worker says so, and tells gRPC's own retries not to send it again.
    assert translated.call_killed_worker == isinstance(error, errors.WorkerCrashed)
    pushback = dict(raised.value.trailing_metadata() or ()).get("grpc-retry-pushback-ms")  # type: ignore[attr-defined]
    assert pushback == ("-1" if isinstance(error, errors.WorkerCrashed) else None)


@pytest.mark.parametrize("text", ["x" * 20000, "é" * 5000], ids=["ascii", "non-ascii"])
def test_a_long_exception_message_still_reaches_the_caller(
    manager: InterpreterManager, package_dir: Path, text: str
) -> None:
    """The status message is cut to 2000 bytes and the traceback in the error trailer to what is
    left of grpc's 8 KiB metadata budget: whole, they would not reach the client at all (it gets
    RESOURCE_EXHAUSTED "received metadata size exceeds ... limit" instead of the error)."""
    scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
    with pytest.raises(RemoteError) as raised:
        scale.call_method("fail", text)
    assert raised.value.remote_type == "ValueError"
    assert "bytes of traceback, cut" in raised.value.remote_traceback
    assert raised.value.remote_traceback.rstrip().splitlines()[-1].startswith("ValueError: "), "the end is kept"
    assert len(raised.value.details.encode()) <= 2000
