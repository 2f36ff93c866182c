"""Bad input gets a precise status and a clear message, and the daemon keeps serving."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from client import (
    DeployError,
    InterpreterManager,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RemoteError,
)
from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc


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


def test_every_error_is_a_deploy_error() -> None:
    for error_type in (InvalidArgumentError, NotFoundError, PermissionDeniedError, RemoteError):
        assert issubclass(error_type, DeployError)


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
