"""A model's exception is told whole once, in the daemon's log under the call's id; what the
caller gets is cut to fit (gRPC metadata, an HTTP body) and names that id. Daemon-side errors
chain the model's traceback as their __cause__ (issue 21, item 3)."""

from __future__ import annotations

import json
import logging
import re
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from client import InterpreterManager, RemoteError
from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc
from server.errors import ModelError, RemoteTraceback, error_from_failure
from server.ipc import protocol
from server.logs import JsonFormatter, PlainFormatter
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, wait_until

PARTS = 600  # lines of the model's exception message: some 16 KB, past every answer's room


def whole_traceback_in(log: str, call_id: str) -> str:
    """The block the daemon logged under call_id: its line and the traceback lines after it."""
    start = log.find(f"call id {call_id}: ")
    if start < 0:
        return ""
    lines = log[start:].splitlines()
    return "\n".join([lines[0], *[line for line in _taking_while_quoted(lines[1:])]])


def _taking_while_quoted(lines: list[str]) -> Iterator[str]:
    for line in lines:
        if not line.startswith("  | "):
            return
        yield line


def assert_logged_whole(daemon: DaemonProcess, call_id: str, method: str) -> str:
    assert wait_until(lambda: f"part {PARTS - 1}" in whole_traceback_in(daemon.log, call_id), 10), daemon.log[-3000:]
    block = whole_traceback_in(daemon.log, call_id)
    assert re.match(rf"call id {re.escape(call_id)}: {method} '[^']*' raised ValueError", block), block[:300]
    assert "  | Traceback (most recent call last):" in block
    assert "in explain" in block or "in fail" in block, "the model's frames, which the answer lost, are logged"
    for part in (0, PARTS // 2, PARTS - 1):
        assert f"  | what went wrong, part {part}" in block.splitlines() or f"part {part}" in block
    assert daemon.log.count(f"call id {call_id}: {method}") == 1, "logged once"
    return block


def test_a_cut_traceback_names_the_call_id_its_whole_one_is_logged_under(
    manager: InterpreterManager, daemon: DaemonProcess, package_dir: Path
) -> None:
    scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
    message = "\n".join(f"what went wrong, part {i}" for i in range(PARTS))
    with pytest.raises(RemoteError) as raised:
        scale.call_method("fail", message)
    error = raised.value
    assert re.fullmatch(r"[0-9a-f]{12}", error.call_id), error.call_id
    where = f"call id {error.call_id}: the whole traceback is in the daemon's log"
    assert error.details.endswith(f"({where})") and len(error.details.encode()) <= 2000
    first_line = error.remote_traceback.splitlines()[0]
    assert "bytes of traceback, cut" in first_line and where in first_line, first_line
    assert "in fail" not in error.remote_traceback, "the answer's traceback lost its start"
    assert error.remote_traceback.rstrip().endswith(f"part {PARTS - 1}"), "and kept its end"
    assert_logged_whole(daemon, error.call_id, "Invoke")
    # The daemon serves on, and an answer with nothing to cut is whole, and still names its id.
    with pytest.raises(RemoteError) as short:
        scale.call_method("fail", "short and clear")
    assert "in fail" in short.value.remote_traceback and "cut" not in short.value.remote_traceback
    assert f"call id {short.value.call_id}:" in short.value.details
    assert torch.equal(scale(torch.ones(2)), torch.full((2,), 2.0))


def test_the_call_id_is_the_callers_request_id_when_it_sends_one(
    manager: InterpreterManager, daemon: DaemonProcess, package_dir: Path
) -> None:
    scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.DeploydStub(channel)
        request = pb.InvokeRequest(object_id=scale.object_id, method="fail", args=[pb.Value(string_value="no")])
        with pytest.raises(grpc.RpcError) as raised:
            stub.Invoke(request, metadata=(("x-request-id", "the-callers-id-31"),), timeout=60)
    assert raised.value.code() == grpc.StatusCode.UNKNOWN
    assert "call id the-callers-id-31: the whole traceback" in raised.value.details()
    assert ("x-request-id", "the-callers-id-31") in tuple(raised.value.trailing_metadata())
    assert wait_until(lambda: "call id the-callers-id-31: Invoke" in daemon.log, 10)
    assert wait_until(lambda: "request_id=the-callers-id-31 " in daemon.log, 10), "the call's line has the same id"


# ---------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def http_daemon(package_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    path = tmp_path_factory.mktemp("tracebacks") / "config.yaml"
    write_config(path, package_dir, server={"http_address": "127.0.0.1:0"}, pool={"workers": 1})
    config = yaml.safe_load(path.read_text())
    config["models"] = [{"name": "raises", "package": "models.pt", "pickle": "models:raises_long.pkl"}]
    path.write_text(yaml.safe_dump(config))
    process = DaemonProcess(path).start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


def infer_raising(daemon: DaemonProcess, parts: int, headers: dict[str, str]) -> tuple[int, dict[str, str], dict]:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [parts], "data": [0.0] * parts}]}
    request = urllib.request.Request(
        f"{daemon.http_url}/v2/models/raises/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    return raised.value.code, dict(raised.value.headers), json.loads(raised.value.read())


def test_over_http_the_body_names_the_call_id_its_whole_traceback_is_logged_under(http_daemon: DaemonProcess) -> None:
    status, headers, body = infer_raising(http_daemon, PARTS * 2, {})
    assert status == 500 and body["type"] == "ValueError"
    call_id = body["call_id"]
    assert headers["x-request-id"] == call_id
    where = f"call id {call_id}: the whole traceback is in the daemon's log"
    assert body["error"].endswith(f"({where})")
    assert body["traceback"].splitlines()[0].endswith(f"cut; {where})"), body["traceback"][:200]
    assert "in explain" not in body["traceback"]
    assert wait_until(lambda: f"part {PARTS * 2 - 1}" in whole_traceback_in(http_daemon.log, call_id), 10)
    assert "in explain" in whole_traceback_in(http_daemon.log, call_id)

    status, headers, body = infer_raising(http_daemon, 3, {"x-request-id": "http-caller-9"})
    assert (status, body["call_id"], headers["x-request-id"]) == (500, "http-caller-9", "http-caller-9")
    assert "in explain" in body["traceback"], "nothing to cut: whole"
    assert wait_until(lambda: "call id http-caller-9: ModelInfer 'raises' raised ValueError" in http_daemon.log, 10)


# ---------------------------------------------------------------------------- units


def test_a_daemon_side_error_chains_the_models_traceback_as_its_cause() -> None:
    remote = 'Traceback (most recent call last):\n  File "model.py", line 3, in forward\nValueError: no\n'
    error = error_from_failure(protocol.Failure(protocol.FAILURE_MODEL_ERROR, "ValueError", "no", remote))
    assert isinstance(error, ModelError)
    assert isinstance(error.__cause__, RemoteTraceback) and error.__cause__.text == remote
    printed = "".join(traceback.format_exception(error))
    assert 'File "model.py", line 3, in forward' in printed
    assert "The above exception was the direct cause of the following exception" in printed
    assert error_from_failure(protocol.Failure(protocol.FAILURE_MODEL_ERROR, "E", "x", "")).__cause__ is None


def test_a_records_fields_stay_on_its_first_line() -> None:
    record = logging.LogRecord("deployd.models", logging.WARNING, __file__, 1, "head\n  | body", None, None)
    record.fields = {"call_id": "abc"}
    assert PlainFormatter().format(record).endswith("head call_id=abc\n  | body")
    assert json.loads(JsonFormatter().format(record))["call_id"] == "abc"
