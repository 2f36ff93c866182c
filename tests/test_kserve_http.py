"""KServe v2 over HTTP/REST on a real daemon (server.http_address), checked with the clients
people use: tritonclient.http (sync and aio), KServe's own InferenceRESTClient, and curl running
the README's quick start. The gRPC twin is tests/test_kserve_v2.py; where both protocols can be
asked the same thing, the HTTP answer (its message, its version) is checked against gRPC's.

One daemon serves most tests (module scope); auth and TLS have daemons of their own."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
import yaml
from tritonclient.utils import InferenceServerException

from client import InterpreterManager
from deployd_wire.dtypes import BY_KSERVE
from tests.conftest import write_config
from tests.daemon_process import REPO, DaemonProcess, wait_until
from tests.test_data_ports import endpoints
from tests.test_kserve_rest import VALUES, expected_bytes
from tests.test_operations import make_certificates, scrape
from tests.v2_models import COMPLEX, DECLARED, ECHO, MANY

T = TypeVar("T")

TIMEOUT = 60.0  # of any one call: generous, for a loaded 2-core machine
TEST_SECONDS = 100.0  # of a test's asyncio loop or subprocess: before pytest-timeout's 120 s
ADMIN_TOKEN = "http-admin-token-5e1d"
INVOKE_TOKEN = "http-invoke-token-c07a"
MAX_JSON = 2 << 20  # the module daemon's server.http_max_json_bytes
MAX_BODY = 8 << 20  # the module daemon's server.http_max_body_bytes: over the 4 MiB tensor of a test

MODELS: list[dict[str, object]] = [
    {"name": "seed", "package": "conv.pt", "pickle": "model:model.pkl"},
    ECHO,
    MANY,
    # Scale undeclared: x * factor + offset, so an offset of the wrong size fails in the model
    {"name": "scale", "package": "models.pt", "pickle": "models:scale.pkl"},
    COMPLEX,
    DECLARED,
    # x * 2 and, per row, the rows of the batch it ran in (tests/test_batching.py's probe)
    {
        "name": "probe",
        "package": "models.pt",
        "pickle": "models:batch_probe.pkl",
        "batching": {"max_batch_size": 16, "max_queue_delay_ms": 5},
    },
]


def _config(path: Path, package_dir: Path, models: list[dict[str, object]], **sections: dict[str, object]) -> Path:
    """write_config's config with HTTP on (any free port) and these models."""
    server = {"http_address": "127.0.0.1:0", **sections.pop("server", {})}
    write_config(path, package_dir, server=server, **sections)
    config = yaml.safe_load(path.read_text())
    config["models"] = models
    path.write_text(yaml.safe_dump(config))
    return path


def _start(config: Path) -> DaemonProcess:
    process = DaemonProcess(config).start()
    if not process.http_port:
        process.assert_clean_stop()
        raise AssertionError(f"the daemon logged no 'http on HOST:PORT':\n{process.log}")
    return process


def _run(awaitable: Awaitable[T]) -> T:
    """Run a coroutine on a loop of its own, bounded in time."""

    async def bounded() -> T:
        async with asyncio.timeout(TEST_SECONDS):
            return await awaitable

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def http_daemon(package_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    config = _config(
        tmp_path_factory.mktemp("http") / "config.yaml",
        package_dir,
        MODELS,
        metrics={"address": "127.0.0.1:0"},
        server={"http_max_body_bytes": MAX_BODY, "http_max_json_bytes": MAX_JSON},
    )
    process = _start(config)
    try:
        yield process
    finally:
        process.assert_clean_stop()


@pytest.fixture
def client(http_daemon: DaemonProcess) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(
        f"127.0.0.1:{http_daemon.http_port}", connection_timeout=TIMEOUT, network_timeout=TIMEOUT
    )
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def grpc_client(http_daemon: DaemonProcess) -> Iterator[triton_grpc.InferenceServerClient]:
    """The same daemon's gRPC port, to compare answers with."""
    connection = triton_grpc.InferenceServerClient(http_daemon.target)
    try:
        yield connection
    finally:
        connection.close()


def _input(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def _grpc_input(name: str, array: np.ndarray, datatype: str) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _output(name: str, binary: bool) -> triton.InferRequestedOutput:
    return triton.InferRequestedOutput(name, binary_data=binary)


def _request(
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request (POST when there is a body): status, headers, body."""
    request = urllib.request.Request(
        url, data=body, headers=headers or {}, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def _infer_json(url: str, model: str, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    return _request(
        f"{url}/v2/models/{model}/infer", json.dumps(request).encode(), {"Content-Type": "application/json"}
    )


def _refused(call: Any) -> InferenceServerException:
    """The error a client call raises (either client's)."""
    with pytest.raises(InferenceServerException) as error:
        call()
    return error.value


# ---------------------------------------------------------------------------- server and models


def test_server_live_ready_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "deployd"
    assert metadata["extensions"] == ["model_repository"]
    assert isinstance(metadata["version"], str) and metadata["version"]


def test_model_ready_by_name_and_version(client: triton.InferenceServerClient) -> None:
    assert client.is_model_ready("seed")
    assert client.is_model_ready("seed", "1")
    assert not client.is_model_ready("seed", "7")
    assert not client.is_model_ready("no-such-model")


def test_model_ready_answers_503_when_not_ready(http_daemon: DaemonProcess) -> None:
    status, _, body = _request(f"{http_daemon.http_url}/v2/models/no-such-model/ready")
    assert (status, json.loads(body)) == (503, {"name": "no-such-model", "ready": False})
    status, _, body = _request(f"{http_daemon.http_url}/v2/models/seed/versions/1/ready")
    assert (status, json.loads(body)) == (200, {"name": "seed", "ready": True})


def test_metadata_declared_in_the_repository_entry(
    client: triton.InferenceServerClient, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    metadata = client.get_model_metadata("declared")
    assert metadata["name"] == "declared"
    assert metadata["platform"] == "pytorch_torch_package"
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [
        {"name": "image", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]
    assert metadata["outputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 2]}]
    assert client.get_model_metadata("declared", "1") == metadata
    over_grpc = grpc_client.get_model_metadata("declared", as_json=True)
    assert [dict(t, shape=[int(s) for s in t["shape"]]) for t in over_grpc["inputs"]] == metadata["inputs"]
    missing = _refused(lambda: client.get_model_metadata("no-such-model"))
    assert missing.status() == "404"
    assert missing.message() == _refused(lambda: grpc_client.get_model_metadata("no-such-model")).message()


def test_metadata_inferred_from_the_last_call(client: triton.InferenceServerClient) -> None:
    client.infer(
        "many", [_input("a", np.zeros((2, 3), np.int32), "INT32"), _input("b", np.zeros(1, np.uint8), "UINT8")]
    )
    metadata = client.get_model_metadata("many")
    assert metadata["inputs"] == [
        {"name": "a", "datatype": "INT32", "shape": [-1, -1]},
        {"name": "b", "datatype": "UINT8", "shape": [-1]},
    ]
    assert metadata["outputs"] == [
        {"name": "output0", "datatype": "INT32", "shape": [-1, -1]},
        {"name": "output1", "datatype": "UINT8", "shape": [-1]},
    ]


def test_seed_answer_equals_deployd_v1_bit_for_bit(
    client: triton.InferenceServerClient, http_daemon: DaemonProcess
) -> None:
    image = torch.randn(1, 1, 10, 10)
    with InterpreterManager(http_daemon.target, timeout=TIMEOUT) as manager:
        expected = manager.model("seed")(image).numpy()
    for binary_in in (True, False):
        for binary_out in (True, False):
            result = client.infer(
                "seed",
                [_input("input0", image.numpy(), "FP32", binary_in)],
                outputs=[_output("output0", binary_out)],
            )
            output = result.as_numpy("output0")
            assert output is not None and output.dtype == np.float32 and output.shape == expected.shape
            assert output.tobytes() == expected.tobytes(), (binary_in, binary_out)
            response = result.get_response()
            assert (response["model_name"], response["model_version"]) == ("seed", "1")


# ---------------------------------------------------------------------------- datatypes

# Every datatype the daemon carries (deployd_wire.dtypes.BY_KSERVE) and BYTES.
ARRAYS: list[tuple[str, np.ndarray]] = [
    ("BOOL", np.array([[True, False, True]], dtype=np.bool_)),
    ("UINT8", np.array([0, 7, 255], dtype=np.uint8)),
    ("INT8", np.array([-128, 0, 127], dtype=np.int8)),
    ("INT16", np.array([-32768, 1, 32767], dtype=np.int16)),
    ("INT32", np.array([[-(2**31), 5], [6, 2**31 - 1]], dtype=np.int32)),
    ("INT64", np.array([-(2**63), 0, 2**63 - 1], dtype=np.int64)),
    ("FP16", np.array([0.5, -1.25, 65504.0, 6e-8], dtype=np.float16)),
    ("BF16", np.array([1.0, -2.5, 0.15625, 3e38], dtype=ml_dtypes.bfloat16)),
    ("FP32", np.arange(12, dtype=np.float32).reshape(3, 4) / 7),
    ("FP32", np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], dtype=np.float32)),  # as Triton writes them
    ("FP32", np.zeros((0, 3), dtype=np.float32)),  # empty
    ("FP64", np.array([np.pi, -np.e, 1e300, 5e-324], dtype=np.float64)),
    # 1-D: a model's list of lists of bytes is several outputs, not one BYTES tensor (as on gRPC)
    ("BYTES", np.array([b"ab", b"", "é ✓".encode(), b"c\x00d"], dtype=np.object_)),
]
MODES = [(True, True), (True, False), (False, True), (False, False)]  # (binary input, binary output)


def test_arrays_cover_every_datatype() -> None:
    assert {datatype for datatype, _ in ARRAYS} == set(BY_KSERVE) | {"BYTES"}


def _same(output: np.ndarray | None, array: np.ndarray) -> bool:
    """Equal as the wire carries them: the same bytes (BYTES: the same items, as bytes)."""
    if output is None or output.shape != array.shape:
        return False
    if array.dtype == np.object_:
        return [item if isinstance(item, bytes) else item.encode() for item in output.flat] == list(array.flat)
    return output.dtype == array.dtype and output.tobytes() == array.tobytes()


def _bf16_json_request(array: np.ndarray, binary_output: bool) -> dict[str, Any]:
    """tritonclient.http refuses to write BF16 as JSON data: the body by hand."""
    return {
        "inputs": [{"name": "x", "datatype": "BF16", "shape": list(array.shape), "data": array.astype(float).tolist()}],
        "outputs": [{"name": "output0", "parameters": {"binary_data": binary_output}}],
    }


@pytest.mark.parametrize(("datatype", "array"), ARRAYS, ids=[f"{d}-{a.shape}" for d, a in ARRAYS])
def test_every_datatype_round_trips_binary_and_json(
    client: triton.InferenceServerClient, http_daemon: DaemonProcess, datatype: str, array: np.ndarray
) -> None:
    for binary_in, binary_out in MODES:
        mode = f"binary input {binary_in}, binary output {binary_out}"
        if datatype == "BF16" and not binary_in:
            status, headers, body = _infer_json(http_daemon.http_url, "echo", _bf16_json_request(array, binary_out))
            assert status == 200, body
            length = headers.get("Inference-Header-Content-Length")
            result = triton.InferenceServerClient.parse_response_body(
                body, header_length=None if length is None else int(length)
            )
        else:
            result = client.infer(
                "echo", [_input("x", array, datatype, binary_in)], outputs=[_output("output0", binary_out)]
            )
        output = result.get_output("output0")
        assert output["datatype"] == datatype and output["shape"] == list(array.shape), mode
        assert ("data" not in output) == binary_out, mode
        assert _same(result.as_numpy("output0"), array), f"{mode}: {result.as_numpy('output0')!r}"


def test_json_data_may_be_nested_by_shape(http_daemon: DaemonProcess) -> None:
    request = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}
    status, _, body = _infer_json(http_daemon.http_url, "echo", request)
    assert status == 200, body
    assert json.loads(body)["outputs"] == [
        {"name": "output0", "datatype": "INT32", "shape": [2, 2], "data": [1, 2, 3, 4]}
    ]


NESTED_BYTES = ["ab", "", "é ✓", "\u2603"]


@pytest.mark.parametrize("datatype", [*sorted(VALUES), "BYTES"])
def test_every_datatype_as_flat_and_nested_json_data(http_daemon: DaemonProcess, datatype: str) -> None:
    """JSON data flat, or nested by the shape, for every datatype (BYTES as strings): the same
    answer, as JSON and as binary data (the bytes the values make). BYTES of shape [2, 2] reach
    the model as two lists of two bytes, which it answers as two outputs, a row each (as on
    gRPC: a list of bytes is one BYTES output): output0 is the first row."""
    values = VALUES.get(datatype, NESTED_BYTES)
    want = None if datatype == "BYTES" else expected_bytes(datatype, values)
    answers: dict[tuple[str, bool], Any] = {}
    for layout, data in (("flat", values), ("nested", [values[:2], values[2:]])):
        for binary in (False, True):
            request = {
                "inputs": [{"name": "x", "datatype": datatype, "shape": [2, 2], "data": data}],
                "outputs": [{"name": "output0", "parameters": {"binary_data": binary}}],
            }
            status, headers, body = _infer_json(http_daemon.http_url, "echo", request)
            assert status == 200, (layout, binary, body)
            if binary:
                length = int(headers["Inference-Header-Content-Length"])
                (output,) = json.loads(body[:length])["outputs"]
                answers[layout, binary] = output, body[length:]
                if want is not None:
                    assert output["parameters"] == {"binary_data_size": len(want)}
                    assert body[length:] == want, (layout, body[length:])
            else:
                (output,) = json.loads(body)["outputs"]
                answers[layout, binary] = output
                if want is not None:
                    assert output["shape"] == [2, 2] and output["datatype"] == datatype
                    assert len(output["data"]) == 4, output  # a flat list in row-major order
    assert answers["flat", False] == answers["nested", False]
    assert answers["flat", True] == answers["nested", True]
    if datatype == "BOOL" or datatype.startswith(("INT", "UINT")):
        assert answers["nested", False]["data"] == values
    if datatype == "BYTES":
        assert answers["nested", False] == {"name": "output0", "datatype": "BYTES", "shape": [2], "data": values[:2]}


def test_binary_data_output_for_the_whole_request(http_daemon: DaemonProcess) -> None:
    request = {
        "inputs": [{"name": "x", "datatype": "INT16", "shape": [3], "data": [1, -2, 3]}],
        "parameters": {"binary_data_output": True},
    }
    status, headers, body = _infer_json(http_daemon.http_url, "echo", request)
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:length])
    assert header["outputs"] == [
        {"name": "output0", "datatype": "INT16", "shape": [3], "parameters": {"binary_data_size": 6}}
    ]
    assert np.frombuffer(body[length:], "<i2").tolist() == [1, -2, 3]


def test_a_large_tensor_and_compressed_bodies(client: triton.InferenceServerClient) -> None:
    big = np.random.default_rng(3).standard_normal((1024, 1024), dtype=np.float32)  # 4 MiB: shared memory
    assert _same(client.infer("echo", [_input("x", big, "FP32")]).as_numpy("output0"), big)
    for algorithm in ("gzip", "deflate"):
        result = client.infer(
            "echo",
            [_input("x", big[:64], "FP32")],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        assert _same(result.as_numpy("output0"), big[:64]), algorithm


def test_bytes_that_are_not_utf8_go_binary_only(client: triton.InferenceServerClient) -> None:
    raw = np.array([b"\xff only"], dtype=np.object_)
    assert list(client.infer("echo", [_input("x", raw, "BYTES")]).as_numpy("output0")) == [b"\xff only"]
    error = _refused(lambda: client.infer("echo", [_input("x", raw, "BYTES")], outputs=[_output("output0", False)]))
    assert error.status() == "400"
    assert "element 0 is not UTF-8" in error.message() and '"binary_data": true' in error.message()


def test_unsupported_datatype_says_so_as_grpc_does(
    client: triton.InferenceServerClient, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    for array in (np.zeros(2, np.uint16), np.zeros(2, np.uint32), np.zeros(2, np.uint64)):
        datatype = {np.uint16: "UINT16", np.uint32: "UINT32", np.uint64: "UINT64"}[array.dtype.type]
        error = _refused(lambda a=array, d=datatype: client.infer("echo", [_input("x", a, d)]))
        assert error.status() == "400" and f"'{datatype}' is not supported" in error.message()
        over_grpc = _refused(lambda a=array, d=datatype: grpc_client.infer("echo", [_grpc_input("x", a, d)]))
        assert error.message() == over_grpc.message()


# ---------------------------------------------------------------------------- inputs and outputs


def test_outputs_selected_and_named(client: triton.InferenceServerClient) -> None:
    first, second, third = (np.full((2,), value, np.float32) for value in (1, 2, 3))
    inputs = [_input(name, array, "FP32") for name, array in zip(("c", "a", "b"), (first, second, third), strict=True)]
    result = client.infer("many", inputs)
    assert [output["name"] for output in result.get_response()["outputs"]] == ["output0", "output1", "output2"]
    picked = client.infer("many", inputs, outputs=[_output("output2", False), _output("output0", True)])
    assert [output["name"] for output in picked.get_response()["outputs"]] == ["output2", "output0"]
    assert picked.get_output("output2")["data"] == [3.0, 3.0]
    assert (picked.as_numpy("output0") == first).all()


def test_declared_inputs_are_matched_by_name(client: triton.InferenceServerClient) -> None:
    image = np.arange(6, dtype=np.float32).reshape(3, 2)
    label = np.array([4, 5, 6], dtype=np.int64)
    result = client.infer("declared", [_input("label", label, "INT64", False), _input("image", image, "FP32")])
    assert sorted(output["name"] for output in result.get_response()["outputs"]) == ["image", "label"]
    assert (result.as_numpy("image") == image).all() and (result.as_numpy("label") == label).all()


def test_request_id_comes_back(client: triton.InferenceServerClient) -> None:
    result = client.infer("echo", [_input("x", np.ones(1, np.float32), "FP32")], request_id="req-71")
    assert result.get_response()["id"] == "req-71"


def test_http_and_grpc_calls_go_through_the_same_batcher(http_daemon: DaemonProcess) -> None:
    """8 callers at once, half over HTTP (JSON and binary), half over gRPC, 10 calls each, on a
    model with batching: each gets its own rows back, and calls did run in batches."""

    def work(caller: int) -> int:
        x = np.full((1, 4), caller, dtype=np.float32)
        client: Any
        if caller % 2:
            client = triton_grpc.InferenceServerClient(http_daemon.target)
            inputs: list[Any] = [_grpc_input("x", x, "FP32")]
        else:
            client = triton.InferenceServerClient(
                f"127.0.0.1:{http_daemon.http_port}", connection_timeout=TIMEOUT, network_timeout=TIMEOUT
            )
            inputs = [_input("x", x, "FP32", binary=caller % 4 == 0)]
        try:
            answers = [client.infer("probe", inputs) for _ in range(10)]
        finally:
            client.close()
        for answer in answers:
            assert (answer.as_numpy("output0") == x * 2).all(), (caller, answer.as_numpy("output0"))
        return max(int(answer.as_numpy("output1")[0]) for answer in answers)

    with ThreadPoolExecutor(8) as pool:
        largest = list(pool.map(work, range(8), timeout=TEST_SECONDS))
    assert max(largest) > 1, largest


# ---------------------------------------------------------------------------- versions


def test_version_pinned_by_number(
    client: triton.InferenceServerClient, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    x = np.ones((1, 1, 10, 10), np.float32)
    result = client.infer("seed", [_input("input0", x, "FP32")], model_version="1")
    assert result.get_response()["model_version"] == "1"
    assert client.get_model_metadata("seed", "1")["versions"] == ["1"]
    for version, status in (("9", "404"), ("latest", "400"), ("0", "400")):
        over_http = _refused(lambda v=version: client.infer("seed", [_input("input0", x, "FP32")], model_version=v))
        over_grpc = _refused(
            lambda v=version: grpc_client.infer("seed", [_grpc_input("input0", x, "FP32")], model_version=v)
        )
        assert (over_http.status(), over_http.message()) == (status, over_grpc.message()), version
    assert "version 9" in _refused(lambda: client.get_model_metadata("seed", "9")).message()


# ---------------------------------------------------------------------------- errors


def test_unknown_model_has_grpcs_message(
    client: triton.InferenceServerClient, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    x = np.zeros(1, np.float32)
    over_http = _refused(lambda: client.infer("no-such-model", [_input("x", x, "FP32")]))
    over_grpc = _refused(lambda: grpc_client.infer("no-such-model", [_grpc_input("x", x, "FP32")]))
    assert over_http.status() == "404" and str(over_grpc.status()) == "StatusCode.NOT_FOUND"
    assert over_http.message() == over_grpc.message()
    assert "no-such-model" in over_http.message()


@pytest.mark.parametrize(
    ("model", "inputs", "words"),
    [
        (
            "declared",
            [("image", np.zeros((3, 5), np.float32), "FP32"), ("label", np.zeros(3, np.int64), "INT64")],
            ["'image'", "shape [3, 5]"],
        ),
        ("declared", [("image", np.zeros((3, 2), np.float64), "FP64")], ["'image'", "FP64", "declares FP32"]),
        ("declared", [("image", np.zeros((1, 2), np.float32), "FP32")], ["missing input", "'label'"]),
        ("declared", [("other", np.zeros(1, np.float32), "FP32")], ["'other'", "no such input"]),
        ("complex", [("x", np.zeros(2, np.float32), "FP32")], ["complex64", "no datatype"]),
    ],
    ids=["shape", "datatype", "missing", "unknown-input", "no-datatype-for-result"],
)
def test_bad_requests_are_400_with_grpcs_message(
    client: triton.InferenceServerClient,
    grpc_client: triton_grpc.InferenceServerClient,
    model: str,
    inputs: list[tuple[str, np.ndarray, str]],
    words: list[str],
) -> None:
    over_http = _refused(lambda: client.infer(model, [_input(n, a, d) for n, a, d in inputs]))
    over_grpc = _refused(lambda: grpc_client.infer(model, [_grpc_input(n, a, d) for n, a, d in inputs]))
    assert over_http.status() == "400", over_http.message()
    assert over_http.message() == over_grpc.message()
    for word in words:
        assert word in over_http.message()


def test_bad_shape_in_the_body_is_400_naming_it(http_daemon: DaemonProcess) -> None:
    url = http_daemon.http_url
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [1, 2, 3]}]}
    status, headers, body = _infer_json(url, "echo", request)
    assert (status, json.loads(body)) == (400, {"error": "input 'x': data has 3 values, shape [4] needs 4"})
    assert headers["Content-Type"] == "application/json"
    header = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 12}}]}
    )
    status, _, body = _request(
        f"{url}/v2/models/echo/infer",
        header.encode() + b"\0" * 12,
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert (status, json.loads(body)) == (
        400,
        {"error": "input 'x': FP32 of shape [4] needs 16 bytes of raw contents, got 12"},
    )
    status, _, body = _request(f"{url}/v2/models/echo/infer", b"{not json")
    assert status == 400 and json.loads(body)["error"].startswith("the request's JSON is not valid")


def _without_call_id(message: str) -> str:
    """A model error's message less the id of its call (each call has its own)."""
    return re.sub(r" \(call id \w+: the whole traceback is in the daemon's log\)$", "", message)


def test_the_models_own_exception_is_500_naming_its_type(
    client: triton.InferenceServerClient, grpc_client: triton_grpc.InferenceServerClient, http_daemon: DaemonProcess
) -> None:
    x, offset = np.ones(3, np.float32), np.ones(2, np.float32)
    over_http = _refused(lambda: client.infer("scale", [_input("x", x, "FP32"), _input("offset", offset, "FP32")]))
    assert over_http.status() == "500"
    assert over_http.message().startswith("RuntimeError: The size of tensor a (3) must match")
    over_grpc = _refused(
        lambda: grpc_client.infer("scale", [_grpc_input("x", x, "FP32"), _grpc_input("offset", offset, "FP32")])
    )
    assert _without_call_id(over_http.message()) == _without_call_id(over_grpc.message())
    inputs = [
        {"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2, 3]},
        {"name": "offset", "datatype": "FP32", "shape": [2], "data": [1, 2]},
    ]
    status, _, body = _infer_json(http_daemon.http_url, "scale", {"inputs": inputs})
    error = json.loads(body)
    assert status == 500 and error["type"] == "RuntimeError"
    assert _without_call_id(error["error"]) == _without_call_id(over_http.message())
    assert f"call id {error['call_id']}: the whole traceback is in the daemon's log" in error["error"]
    assert "testmodels" in error["traceback"] and "x * self.factor + offset" in error["traceback"]


def _raw_exchange(port: int, head: bytes, chunks: list[bytes]) -> tuple[int, dict[str, str], bytes]:
    """Send head and chunks on a socket of its own and read one answer (the status, its headers
    and its body, by its Content-Length) without sending anything more: an answer that comes was
    given to what was sent so far."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as connection:
        connection.sendall(head)
        for chunk in chunks:
            connection.sendall(chunk)
        received = b""
        while b"\r\n\r\n" not in received:
            data = connection.recv(65536)
            assert data, f"the connection closed without an answer: {received!r}"
            received += data
        top, _, body = received.partition(b"\r\n\r\n")
        status_line, *header_lines = top.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
        while len(body) < int(headers.get("content-length", "0")):
            data = connection.recv(65536)
            assert data, f"the connection closed in the answer's body: {body!r}"
            body += data
    return int(status_line.split()[1]), headers, body


def test_a_body_over_the_cap_is_413_before_it_is_read(http_daemon: DaemonProcess) -> None:
    """Refused by its Content-Length with not a byte of it sent; a chunked body (no length)
    as soon as it passes the cap, its end never sent."""
    over = {"error": f"the request body is over {MAX_BODY} bytes (server.http_max_body_bytes)"}
    path = b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for length in (MAX_BODY + 1, 1 << 40):
        head = path + b"Content-Length: %d\r\n\r\n" % length
        status, headers, body = _raw_exchange(http_daemon.http_port, head, [])
        assert (status, json.loads(body)) == (413, over), length
        assert headers["content-type"].startswith("application/json")
    piece = b"x" * (1 << 20)
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (MAX_BODY // len(piece) + 1)  # no 0-size last chunk
    status, _, body = _raw_exchange(http_daemon.http_port, path + b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert (status, json.loads(body)) == (413, over)
    status, _, _ = _infer_json(
        http_daemon.http_url, "echo", {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}]}
    )
    assert status == 200, "the daemon serves on"


def test_json_over_its_cap_is_413_and_the_same_tensor_as_binary_data_is_served(http_daemon: DaemonProcess) -> None:
    """Parsed JSON takes about 10x its size: an infer whose JSON is over
    server.http_max_json_bytes is refused (by its Content-Length before it is read), while the
    same values as binary data, within the body's cap, are answered."""
    values = [1.5] * (MAX_JSON // 4)  # "1.5, " a value: about 5 bytes each
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(values)], "data": values}]}
    status, _, body = _infer_json(http_daemon.http_url, "echo", request)
    assert status == 413, body[:200]
    assert "server.http_max_json_bytes" in json.loads(body)["error"]
    # A binary body whose JSON header says it is over the cap is refused too.
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}).encode()
    head = (
        b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (MAX_JSON + 1, MAX_JSON + 8)
    )
    status, _, body = _raw_exchange(http_daemon.http_port, head, [header.ljust(MAX_JSON + 8)])
    assert status == 413 and "server.http_max_json_bytes" in json.loads(body)["error"]
    client = triton.InferenceServerClient(http_daemon.http_url.removeprefix("http://"))
    try:
        tensor = np.full(len(values), 1.5, dtype=np.float32)
        infer_input = triton.InferInput("x", list(tensor.shape), "FP32")
        infer_input.set_data_from_numpy(tensor, binary_data=True)
        result = client.infer("echo", [infer_input])
        assert np.array_equal(result.as_numpy(result.get_response()["outputs"][0]["name"]), tensor)
    finally:
        client.close()


def test_a_full_queue_is_503_with_retry_after_and_grpcs_message(package_dir: Path, tmp_path: Path) -> None:
    """One worker busy with a call that runs until its caller hangs up, one call waiting for
    it (pool.max_queued_calls: 1): the next is refused at once, 503 with Retry-After, the
    message gRPC's ModelInfer gives, counted RESOURCE_EXHAUSTED. Hanging up frees both."""
    patient = {"name": "patient", "package": "models.pt", "pickle": "models:patient.pkl"}
    config = _config(
        tmp_path / "config.yaml",
        package_dir,
        [patient],
        pool={"workers": 1, "max_queued_calls": 1},
        metrics={"address": "127.0.0.1:0"},
    )
    process = _start(config)
    held: list[http.client.HTTPConnection] = []
    try:
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]})
        with InterpreterManager(process.target, timeout=TIMEOUT) as manager:
            for waiting in (0, 1):
                connection = http.client.HTTPConnection("127.0.0.1", process.http_port, timeout=TIMEOUT)
                connection.request("POST", "/v2/models/patient/infer", body, {"Content-Type": "application/json"})
                held.append(connection)
                assert wait_until(
                    lambda w=waiting: (
                        all(worker.state == "busy" for worker in manager.status().workers)
                        and manager.status().queued_calls == w
                    ),
                    TIMEOUT,
                ), manager.status()
            before = scrape(process)
            status, headers, answer = _infer_json(process.http_url, "patient", json.loads(body))
            error = json.loads(answer)
            assert status == 503 and headers["Retry-After"] == "1", (status, headers, error)
            assert "pool.max_queued_calls=1" in error["error"], error
            grpc_connection = triton_grpc.InferenceServerClient(process.target)
            try:
                over_grpc = _refused(
                    lambda: grpc_connection.infer("patient", [_grpc_input("x", np.ones(1, np.float32), "FP32")])
                )
            finally:
                grpc_connection.close()
            assert str(over_grpc.status()) == "StatusCode.RESOURCE_EXHAUSTED"
            assert over_grpc.message() == error["error"]
            full = {"method": "ModelInfer", "model": "patient", "code": "RESOURCE_EXHAUSTED", "protocol": "http"}
            assert _calls_total(scrape(process), **full) - _calls_total(before, **full) == 1
            for connection in held:  # the running call sees its caller gone; the waiting one leaves the line
                connection.close()
            held.clear()
            assert wait_until(
                lambda: (
                    manager.status().queued_calls == 0
                    and not any(worker.state == "busy" for worker in manager.status().workers)
                ),
                TIMEOUT,
            ), manager.status()
    finally:
        for connection in held:
            connection.close()
        process.assert_clean_stop()


def test_unknown_path_and_method_are_json_errors(http_daemon: DaemonProcess) -> None:
    status, _, body = _request(f"{http_daemon.http_url}/v2/nowhere")
    assert (status, json.loads(body)) == (404, {"error": "no such endpoint: /v2/nowhere"})
    status, headers, body = _request(f"{http_daemon.http_url}/v2/health/live", b"{}")
    assert (status, json.loads(body)) == (405, {"error": "POST is not allowed here"})
    assert "GET" in headers["Allow"]


# ---------------------------------------------------------------------------- model repository


def test_repository_index_unload_and_load(client: triton.InferenceServerClient) -> None:
    index = {model["name"]: model for model in client.get_model_repository_index()}
    assert index["seed"] == {"name": "seed", "version": "1", "state": "READY"}
    assert set(index) == {model["name"] for model in MODELS}
    client.unload_model("complex")
    try:
        assert not client.is_model_ready("complex")
        index = {model["name"]: model for model in client.get_model_repository_index()}
        assert index["complex"]["state"] == "UNAVAILABLE" and "version" not in index["complex"]
    finally:
        client.load_model("complex")
    assert client.is_model_ready("complex")
    assert len(client.get_model_metadata("complex")["versions"]) == 1


def test_load_a_new_model_by_name_with_its_entry(client: triton.InferenceServerClient) -> None:
    client.load_model("scaler", config=json.dumps({"package": "models.pt", "pickle": "models:scale.pkl"}))
    try:
        result = client.infer("scaler", [_input("x", np.array([3.0], np.float32), "FP32")])
        assert result.as_numpy("output0").tolist() == [6.0]
        assert "scaler" in {model["name"] for model in client.get_model_repository_index()}
    finally:
        client.unload_model("scaler")
    assert not client.is_model_ready("scaler")
    unknown = _refused(lambda: client.load_model("not-in-the-repository"))
    assert unknown.status() == "404"
    bad = _refused(lambda: client.load_model("bad", config=json.dumps({"package": "models.pt", "pickle": "no"})))
    assert bad.status() == "400" and "module:file" in bad.message()


# ---------------------------------------------------------------------------- tritonclient.http.aio


def test_aio_client(http_daemon: DaemonProcess) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    words = np.array([b"one", "zwei ✓".encode()], dtype=np.object_)

    async def calls() -> None:
        async with triton_aio.InferenceServerClient(
            f"127.0.0.1:{http_daemon.http_port}", conn_timeout=TIMEOUT
        ) as client:
            assert await client.is_server_live() and await client.is_server_ready()
            assert (await client.get_server_metadata())["name"] == "deployd"
            assert await client.is_model_ready("echo") and not await client.is_model_ready("no-such-model")
            metadata = await client.get_model_metadata("declared")
            assert [tensor["name"] for tensor in metadata["inputs"]] == ["image", "label"]
            calls = [
                client.infer(
                    "echo",
                    [_input("x", array, datatype, binary_in)],
                    outputs=[_output("output0", binary_out)],
                )
                for binary_in, binary_out in MODES
                for array, datatype in ((x, "FP32"), (words, "BYTES"))
            ]
            results = await asyncio.gather(*calls)
            for index, result in enumerate(results):
                assert _same(result.as_numpy("output0"), (x, words)[index % 2]), index
            with pytest.raises(InferenceServerException) as error:
                await client.infer("no-such-model", [_input("x", x, "FP32")])
            assert error.value.status() == "404" and "no-such-model" in error.value.message()

    _run(calls())


# ---------------------------------------------------------------------------- metrics and logs


def _calls_total(text: str, **labels: str) -> float:
    """deployd_calls_total of one series (0 before its first call)."""
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric == "deployd_calls_total" and dict(re.findall(r'(\w+)="([^"]*)"', label_text)) == labels:
            return float(value)
    return 0.0


def test_calls_count_with_protocol_http_and_log_a_line(
    client: triton.InferenceServerClient, grpc_client: triton_grpc.InferenceServerClient, http_daemon: DaemonProcess
) -> None:
    ok = {"method": "ModelInfer", "model": "echo", "code": "OK", "protocol": "http"}
    missing = {"method": "ModelInfer", "model": "", "code": "NOT_FOUND", "protocol": "http"}
    before = scrape(http_daemon)
    for number in range(3):
        client.infer(
            "echo", [_input("x", np.ones(1, np.float32), "FP32")], headers={"x-request-id": f"http-m-{number}"}
        )
    with pytest.raises(InferenceServerException):
        client.infer("no-such-model", [_input("x", np.ones(1, np.float32), "FP32")])
    after = scrape(http_daemon)
    assert _calls_total(after, **ok) - _calls_total(before, **ok) == 3
    assert _calls_total(after, **missing) - _calls_total(before, **missing) == 1
    grpc = {**ok, "protocol": "grpc"}
    assert _calls_total(after, **grpc) == _calls_total(before, **grpc)  # not counted as gRPC's

    def logged(request_id: str) -> str:
        return next((line for line in http_daemon.lines if f"request_id={request_id} " in line), "")

    assert wait_until(lambda: all(logged(f"http-m-{n}") for n in range(3)), TIMEOUT)
    line = logged("http-m-2")
    for field in ("method=ModelInfer", "object=echo", "status=OK", "http_status=200", "protocol=http"):
        assert field in line, line
    # The same call over gRPC: its line has the same fields (HTTP's adds http_status and protocol).
    grpc_client.infer("echo", [_grpc_input("x", np.ones(1, np.float32), "FP32")], headers={"x-request-id": "grpc-m"})
    assert wait_until(lambda: bool(logged("grpc-m")), TIMEOUT)
    grpc_line = logged("grpc-m")
    assert "method=ModelInfer" in grpc_line and "object=echo" in grpc_line and "status=OK" in grpc_line, grpc_line

    def keys(text: str) -> list[str]:
        return re.findall(r"(?:^|\s)(\w+)=", text)

    assert [key for key in keys(line) if key not in ("http_status", "protocol")] == keys(grpc_line), (line, grpc_line)
    assert wait_until(
        lambda: any(
            "object=no-such-model" in x and "http_status=404" in x and "protocol=http" in x for x in http_daemon.lines
        ),
        TIMEOUT,
    )


# ---------------------------------------------------------------------------- KServe's InferenceRESTClient

# Run in a process of its own: kserve's generated v2 messages register the protobuf package
# `inference`, which tritonclient.grpc (this process, and test_kserve_v2 in the same pytest run)
# has registered already, and the descriptor pool refuses a second. kserve/__init__.py imports
# its whole model server (FastAPI app, Kubernetes client, ...); only its REST client is needed,
# so the package is entered without running __init__ (the dev extras install what that client
# imports, not kserve's own dependencies: see the Makefile).
KSERVE_SCRIPT = """
import asyncio, base64, importlib.util, json, sys, types

spec = importlib.util.find_spec("kserve")
package = types.ModuleType("kserve")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["kserve"] = package

import httpx
import numpy as np
from kserve.inference_client import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

url = sys.argv[1]


async def main():
    answers = {}
    async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=60, retries=0)) as client:
        answers["server_ready"] = await client.is_server_ready(url)
        answers["server_live"] = await client.is_server_live(url)
        answers["seed_ready"] = await client.is_model_ready(url, "seed")
        answers["unknown_ready"] = await client.is_model_ready(url, "no-such-model")
        x = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
        words = np.array(["ab", "zwei ✓"], dtype=object)
        for binary in (False, True):
            inputs = [InferInput("x", list(x.shape), "FP32"), InferInput("y", [2], "BYTES")]
            inputs[0].set_data_from_numpy(x, binary_data=binary)
            inputs[1].set_data_from_numpy(words, binary_data=binary)
            outputs = [RequestedOutput(name, {"binary_data": binary}) for name in ("output0", "output1")]
            request = InferRequest("many", inputs, request_id=f"k-{binary}", request_outputs=outputs)
            response = await client.infer(url, request, model_name="many")
            first, second = response.outputs
            answers[f"many_{binary}"] = {
                "model_name": response.model_name,
                "id": response.id,
                "names": [first.name, second.name],
                "x": base64.b64encode(first.as_numpy().astype(np.float32).tobytes()).decode(),
                "shape": list(first.as_numpy().shape),
                "words": [w.decode() if isinstance(w, bytes) else w for w in second.as_numpy().tolist()],
            }
        image = InferInput("input0", [1, 1, 10, 10], "FP32")
        image.set_data_from_numpy(np.ones((1, 1, 10, 10), np.float32), binary_data=True)
        outputs = [RequestedOutput("output0", {"binary_data": True})]
        response = await client.infer(url, InferRequest("seed", [image], request_outputs=outputs), model_name="seed")
        answers["seed"] = base64.b64encode(response.outputs[0].as_numpy().tobytes()).decode()
        try:
            await client.infer(url, InferRequest("no-such-model", [image]), model_name="no-such-model")
        except httpx.HTTPStatusError as error:
            answers["unknown"] = [error.response.status_code, str(error)]
    print(json.dumps(answers))


asyncio.run(main())
"""


def test_kserve_inference_rest_client(client: triton.InferenceServerClient, http_daemon: DaemonProcess) -> None:
    run = subprocess.run(
        [sys.executable, "-c", KSERVE_SCRIPT, http_daemon.http_url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TEST_SECONDS,
    )
    assert run.returncode == 0, run.stderr
    answers = json.loads(run.stdout.strip().splitlines()[-1])
    assert answers["server_ready"] is True and answers["server_live"] is True
    assert answers["seed_ready"] is True and answers["unknown_ready"] is False
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    for binary in (False, True):
        many = answers[f"many_{binary}"]
        assert (many["model_name"], many["id"], many["names"]) == ("many", f"k-{binary}", ["output0", "output1"])
        assert base64.b64decode(many["x"]) == x.tobytes() and many["shape"] == [2, 3]
        assert many["words"] == ["ab", "zwei ✓"]
    expected = client.infer("seed", [_input("input0", np.ones((1, 1, 10, 10), np.float32), "FP32")])
    assert base64.b64decode(answers["seed"]) == expected.as_numpy("output0").tobytes()
    status, message = answers["unknown"]
    assert status == 404 and message.startswith("no model 'no-such-model' is loaded, '404 Not Found'")


# ---------------------------------------------------------------------------- curl: the README's quick start

README_HEADING = "### KServe v2 over HTTP (curl)"


def _readme_curl_lines() -> list[tuple[str, str]]:
    """Each curl line in the ```bash blocks under README_HEADING (up to the next heading), with
    what its comment (on the line, or the comment line after it) says it answers."""
    lines = (REPO / "README.md").read_text().splitlines()
    if README_HEADING not in lines:
        pytest.skip(f"README.md has no heading {README_HEADING!r} (the curl quick start) to run")
    commands: list[tuple[str, str]] = []
    fence = ""  # the open block's language ("" outside a block)
    for line in lines[lines.index(README_HEADING) + 1 :]:
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = "" if fence else stripped[3:].strip() or "text"
        elif not fence and re.match(r"#{1,3} ", line):
            break
        elif fence != "bash":
            continue
        elif stripped.startswith("curl "):
            commands.append(_split_comment(stripped))
        elif stripped.startswith("#") and commands and not commands[-1][1]:
            commands[-1] = (commands[-1][0], stripped.lstrip("# "))
    return commands


def _split_comment(line: str) -> tuple[str, str]:
    """A shell line and its trailing comment (a # outside quotes, after a space)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and index and line[index - 1].isspace():
            return line[:index].rstrip(), line[index + 1 :].strip()
    return line, ""


def _expected(comment: str) -> tuple[int, Any]:
    """The status a comment names first (else 200), and the JSON after it if it is whole JSON."""
    match = re.match(r"(\d{3})\b\s*(.*)", comment)
    status, rest = (int(match.group(1)), match.group(2)) if match else (200, comment)
    start = min((rest.find(c) for c in "{[" if rest.find(c) >= 0), default=-1)
    if start < 0:
        return status, None
    try:
        value, _ = json.JSONDecoder().raw_decode(rest[start:])
    except ValueError:  # an illustration ("version": ...), not a value
        return status, None
    return status, value


def test_readme_curl_quick_start(http_daemon: DaemonProcess) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    lines = _readme_curl_lines()
    assert lines, f"no curl line under {README_HEADING!r}"
    address = f"127.0.0.1:{http_daemon.http_port}"
    for command, comment in lines:
        args = shlex.split(command.replace("localhost:8000", address))
        run = subprocess.run(
            [curl, *args[1:], "--max-time", str(int(TIMEOUT)), "-w", "\n%{http_code}"],
            capture_output=True,
            text=True,
            timeout=2 * TIMEOUT,
        )
        assert run.returncode == 0, f"{command}\n{run.stderr}"
        body, _, code = run.stdout.rpartition("\n")
        status, expected = _expected(comment)
        assert int(code) == status, f"{command}\n{code} {body}"
        answer = json.loads(body)
        if isinstance(expected, dict):
            assert {key: answer.get(key) for key in expected} == expected, f"{command}\n{body}"
        elif isinstance(expected, list):
            assert all(item in answer for item in expected), f"{command}\n{body}"


# ---------------------------------------------------------------------------- auth


@pytest.fixture(scope="module")
def auth_daemon(package_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    config = _config(
        tmp_path_factory.mktemp("http-auth") / "config.yaml",
        package_dir,
        MODELS[:2],
        pool={"workers": 1},
        auth={"admin_tokens": [ADMIN_TOKEN], "invoke_tokens": [INVOKE_TOKEN]},
        metrics={"address": "127.0.0.1:0"},
    )
    process = _start(config)
    try:
        yield process
    finally:
        process.assert_clean_stop()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_auth_bearer_tokens(auth_daemon: DaemonProcess) -> None:
    client = triton.InferenceServerClient(
        f"127.0.0.1:{auth_daemon.http_port}", connection_timeout=TIMEOUT, network_timeout=TIMEOUT
    )
    try:
        x = np.ones(2, np.float32)
        # Health is open to all, as gRPC's health service is: orchestrators' probes carry no token.
        assert client.is_server_live() and client.is_server_ready()
        for headers in ({}, _bearer("wrong-token"), {"Authorization": INVOKE_TOKEN}):
            refused = _refused(lambda h=headers: client.infer("echo", [_input("x", x, "FP32")], headers=h))
            assert (refused.status(), refused.message()) == ("401", "a valid bearer token is required"), headers
        assert not client.is_model_ready("echo")  # 401
        status, headers, _ = _request(f"{auth_daemon.http_url}/v2/models/echo/ready")
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        status, _, _ = _request(f"{auth_daemon.http_url}/v2/health/ready")
        assert status == 200
        for path in ("index", "models/echo/unload", "models/echo/load"):  # the repository: no token, 401
            status, _, body = _request(f"{auth_daemon.http_url}/v2/repository/{path}", b"{}")
            assert (status, json.loads(body)) == (401, {"error": "a valid bearer token is required"}), path

        caller = _bearer(INVOKE_TOKEN)
        assert client.is_model_ready("echo", headers=caller)
        assert client.get_server_metadata(headers=caller)["name"] == "deployd"
        result = client.infer("echo", [_input("x", x, "FP32")], headers=caller)
        assert result.as_numpy("output0").tolist() == [1.0, 1.0]
        for method, call in (
            ("RepositoryIndex", lambda: client.get_model_repository_index(headers=caller)),
            ("RepositoryModelUnload", lambda: client.unload_model("echo", headers=caller)),
            ("RepositoryModelLoad", lambda: client.load_model("echo", headers=caller)),
        ):
            denied = _refused(call)
            assert (denied.status(), denied.message()) == ("403", f"{method} needs an admin token")
        assert client.is_model_ready("echo", headers=caller)

        admin = _bearer(ADMIN_TOKEN)
        assert {model["name"] for model in client.get_model_repository_index(headers=admin)} == {"seed", "echo"}
        client.unload_model("echo", headers=admin)
        assert not client.is_model_ready("echo", headers=caller)
        client.load_model("echo", headers=admin)
        assert client.is_model_ready("echo", headers=caller)
    finally:
        client.close()

    async def aio_calls() -> None:
        async with triton_aio.InferenceServerClient(
            f"127.0.0.1:{auth_daemon.http_port}", conn_timeout=TIMEOUT
        ) as aio_client:
            assert await aio_client.is_server_ready()
            with pytest.raises(InferenceServerException) as error:
                await aio_client.infer("echo", [_input("x", x, "FP32")])
            assert error.value.status() == "401"
            result = await aio_client.infer("echo", [_input("x", x, "FP32")], headers=_bearer(INVOKE_TOKEN))
            assert result.as_numpy("output0").tolist() == [1.0, 1.0]

    _run(aio_calls())
    assert not any(token in auth_daemon.log for token in (ADMIN_TOKEN, INVOKE_TOKEN))


def test_a_call_without_a_token_is_counted_without_its_made_up_name(auth_daemon: DaemonProcess) -> None:
    for number in range(3):
        status, _, _ = _request(f"{auth_daemon.http_url}/v2/models/made-up-{number}/infer", b"{}")
        assert status == 401
    text = scrape(auth_daemon)
    refused = {"method": "ModelInfer", "model": "", "code": "UNAUTHENTICATED"}
    assert _calls_total(text, **refused, protocol="http") >= 3
    assert "made-up-" not in text


# ---------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_tls_with_the_grpc_ports_certificate(package_dir: Path, tmp_path: Path, mutual: bool) -> None:
    certs = make_certificates(tmp_path)
    tls = {"cert_file": str(certs["server.pem"]), "key_file": str(certs["server.key"])}
    if mutual:
        tls["client_ca_file"] = str(certs["ca.pem"])
    process = _start(_config(tmp_path / "config.yaml", package_dir, MODELS[1:2], pool={"workers": 1}, tls=tls))
    try:
        address = f"127.0.0.1:{process.http_port}"
        x = np.array([1.5, -2.0], np.float32)
        options = {"ca_certs": str(certs["ca.pem"])}
        if mutual:
            options |= {"certfile": str(certs["client.pem"]), "keyfile": str(certs["client.key"])}
        client = triton.InferenceServerClient(
            address, ssl=True, ssl_options=options, connection_timeout=TIMEOUT, network_timeout=TIMEOUT
        )
        try:
            assert client.is_server_ready()
            assert client.infer("echo", [_input("x", x, "FP32")]).as_numpy("output0").tolist() == [1.5, -2.0]
        finally:
            client.close()

        context = ssl.create_default_context(cafile=str(certs["ca.pem"]))
        if mutual:
            context.load_cert_chain(str(certs["client.pem"]), str(certs["client.key"]))

        async def aio_calls() -> None:
            async with triton_aio.InferenceServerClient(
                address, ssl=True, ssl_context=context, conn_timeout=TIMEOUT
            ) as aio_client:
                result = await aio_client.infer("echo", [_input("x", x, "FP32", binary=False)])
                assert result.as_numpy("output0").tolist() == [1.5, -2.0]

        _run(aio_calls())

        # Plain HTTP to the TLS port: no answer (aiohttp closes the connection).
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _request(f"http://{address}/v2/health/ready")
        if mutual:  # TLS without a client certificate: refused in the handshake
            bare = ssl.create_default_context(cafile=str(certs["ca.pem"]))
            with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
                _request(f"https://{address}/v2/health/ready", context=bare)
        else:
            status, _, body = _request(f"https://{address}/v2/health/ready", context=context)
            assert (status, json.loads(body)) == (200, {"ready": True})
    finally:
        process.assert_clean_stop()


# ---------------------------------------------------------------------------- data ports; the flag


def test_http_stays_on_the_daemon_when_workers_serve_data_ports(package_dir: Path, tmp_path: Path) -> None:
    """With pool.data_ports the workers serve gRPC only (Endpoints lists their gRPC ports); HTTP
    is the daemon's, on the daemon path, and answers as without data ports. HTTP comes from
    --http-address here (the config has none)."""
    config = _config(tmp_path / "config.yaml", package_dir, [ECHO], pool={"data_ports": 0}, server={"http_address": ""})
    process = DaemonProcess(config, "--http-address", "127.0.0.1:0").start()
    try:
        assert process.http_port, f"--http-address gave no 'http on HOST:PORT':\n{process.log}"
        workers = endpoints(process.target).workers
        assert len(workers) == 2 and all(worker.address for worker in workers)
        assert process.http_port not in {int(worker.address.rpartition(":")[2]) for worker in workers}
        x = np.array([[1.5, -2.0], [3.0, 0.25]], np.float32)
        client = triton.InferenceServerClient(
            f"127.0.0.1:{process.http_port}", connection_timeout=TIMEOUT, network_timeout=TIMEOUT
        )
        try:
            assert client.is_server_ready() and client.is_model_ready("echo")
            for binary in (True, False):
                result = client.infer(
                    "echo",
                    [_input("x", x, "FP32", binary)],
                    outputs=[_output("output0", binary)],
                    headers={"x-request-id": f"http-dp-{binary}"},
                )
                assert _same(result.as_numpy("output0"), x), binary
            missing = _refused(lambda: client.infer("no-such-model", [_input("x", x, "FP32")]))
            assert missing.status() == "404"
        finally:
            client.close()
        # A worker's data port serves the same model over gRPC meanwhile.
        over_grpc = triton_grpc.InferenceServerClient(workers[0].address)
        try:
            result = over_grpc.infer("echo", [_grpc_input("x", x, "FP32")])
            assert _same(result.as_numpy("output0"), x)
        finally:
            over_grpc.close()

        def logged(request_id: str) -> str:
            return next((line for line in process.lines if f"request_id={request_id} " in line), "")

        assert wait_until(lambda: all(logged(f"http-dp-{binary}") for binary in (True, False)), TIMEOUT)
        for binary in (True, False):
            line = logged(f"http-dp-{binary}")
            assert "protocol=http" in line and "status=OK" in line, line
            assert "worker=" not in line, f"an HTTP call answered by a worker, not the daemon: {line}"
    finally:
        process.assert_clean_stop()


def test_an_empty_http_address_turns_http_off(package_dir: Path, tmp_path: Path) -> None:
    """--http-address '' over a config that serves HTTP: no HTTP server, no 'http on' line."""
    config = _config(tmp_path / "config.yaml", package_dir, [ECHO], pool={"workers": 1})
    process = DaemonProcess(config, "--http-address", "").start()
    try:
        assert process.http_port == 0 and "http on" not in process.log, process.log
    finally:
        process.assert_clean_stop()
