"""KServe v2 / Open Inference Protocol on the daemon's port, checked with tritonclient (the
maintained v2 client from PyPI) and, where its high-level API cannot say it (typed contents,
a request that does not parse), with the protobuf stubs it ships. (Not with deployd_wire/proto's:
both register the package `inference` in one process's descriptor pool, which refuses that.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as v2  # the v2 messages as Triton's client has them
from tritonclient.grpc import service_pb2_grpc as v2_grpc
from tritonclient.utils import InferenceServerException

from client import InterpreterManager
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess
from tests.v2_models import COMPLEX, DECLARED, ECHO, MANY, SCALED

MODELS = [
    {"name": "seed", "package": "conv.pt", "pickle": "model:model.pkl"},
    ECHO,
    MANY,
    COMPLEX,
    DECLARED,
    SCALED,
]


def _config(path: Path, package_dir: Path, **sections: dict[str, object]) -> Path:
    write_config(path, package_dir, **sections)
    import yaml

    config = yaml.safe_load(path.read_text())
    config["models"] = MODELS
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def v2_daemon(package_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    process = DaemonProcess(_config(tmp_path_factory.mktemp("v2") / "config.yaml", package_dir)).start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


@pytest.fixture
def triton_client(v2_daemon: DaemonProcess) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(v2_daemon.target)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def stub(v2_daemon: DaemonProcess) -> Iterator[v2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(v2_daemon.target) as channel:
        yield v2_grpc.GRPCInferenceServiceStub(channel)


def _input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _status(error: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(error.value.status())


# ---------------------------------------------------------------------------- server and models


def test_server_live_ready_and_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    metadata = triton_client.get_server_metadata()
    assert metadata.name == "deployd"
    assert "model_repository" in metadata.extensions


def test_model_ready_by_name_and_version(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_model_ready("seed")
    assert triton_client.is_model_ready("seed", "1")
    assert not triton_client.is_model_ready("seed", "7")
    assert not triton_client.is_model_ready("no-such-model")


def test_seed_answer_equals_deployd_v1_bit_for_bit(
    triton_client: triton.InferenceServerClient, v2_daemon: DaemonProcess
) -> None:
    image = torch.randn(1, 1, 10, 10)
    result = triton_client.infer("seed", [_input("input0", image.numpy(), "FP32")])
    output = result.as_numpy("output0")
    with InterpreterManager(v2_daemon.target) as manager:
        expected = manager.model("seed")(image)
    assert output is not None and output.dtype == np.float32
    assert output.shape == tuple(expected.shape)
    assert output.tobytes() == expected.numpy().tobytes()
    response = result.get_response()
    assert response.model_name == "seed" and response.model_version == "1"


def test_metadata_inferred_from_the_last_call(triton_client: triton.InferenceServerClient) -> None:
    triton_client.infer("seed", [_input("input0", np.zeros((2, 1, 10, 10), np.float32), "FP32")])
    metadata = triton_client.get_model_metadata("seed")
    assert metadata.platform == "pytorch_torch_package"
    assert list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input0", "FP32", [-1, -1, -1, -1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("output0", "FP32", [-1, -1, -1, -1])]


def test_metadata_declared_in_the_repository_entry(triton_client: triton.InferenceServerClient) -> None:
    metadata = triton_client.get_model_metadata("declared")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("image", "FP32", [-1, 2]),
        ("label", "INT64", [-1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("image", "FP32", [-1, 2])]
    with pytest.raises(InferenceServerException) as error:
        triton_client.get_model_metadata("no-such-model")
    assert _status(error) == "StatusCode.NOT_FOUND"


# ---------------------------------------------------------------------------- datatypes

NUMERIC = [
    ("BOOL", np.array([[True, False, True]], dtype=np.bool_)),
    ("UINT8", np.array([0, 7, 255], dtype=np.uint8)),
    ("INT8", np.array([-128, 0, 127], dtype=np.int8)),
    ("INT16", np.array([-32768, 1, 32767], dtype=np.int16)),
    ("INT32", np.array([[-(2**31), 5], [6, 2**31 - 1]], dtype=np.int32)),
    ("INT64", np.array([-(2**63), 0, 2**63 - 1], dtype=np.int64)),
    ("FP16", np.array([0.5, -1.25, 65504.0], dtype=np.float16)),
    ("FP32", np.arange(12, dtype=np.float32).reshape(3, 4) / 7),
    ("FP64", np.array([np.pi, -np.e, 1e300], dtype=np.float64)),
    ("FP32", np.zeros((0, 3), dtype=np.float32)),  # empty
]


@pytest.mark.parametrize(("datatype", "array"), NUMERIC, ids=[f"{d}-{a.shape}" for d, a in NUMERIC])
def test_every_datatype_round_trips_through_echo(
    triton_client: triton.InferenceServerClient, datatype: str, array: np.ndarray
) -> None:
    result = triton_client.infer("echo", [_input("x", array, datatype)])
    output = result.as_numpy("output0")
    assert result.get_output("output0").datatype == datatype
    assert output is not None and output.dtype == array.dtype and output.shape == array.shape
    assert output.tobytes() == array.tobytes()


def test_bf16_round_trips(triton_client: triton.InferenceServerClient) -> None:
    values = np.array([1.0, -2.5, 0.15625], dtype=ml_dtypes.bfloat16)
    result = triton_client.infer("echo", [_input("x", values, "BF16")])
    assert result.get_output("output0").datatype == "BF16"
    output = result.as_numpy("output0")
    assert output is not None and output.tobytes() == values.tobytes()
    assert (
        output.tobytes() == torch.tensor([1.0, -2.5, 0.15625], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    )


def test_bytes_round_trip(triton_client: triton.InferenceServerClient) -> None:
    several = np.array([b"ab", b"", b"c\x00d"], dtype=np.object_)
    result = triton_client.infer("echo", [_input("x", several, "BYTES")])
    assert result.get_output("output0").datatype == "BYTES"
    assert list(result.as_numpy("output0")) == [b"ab", b"", b"c\x00d"]
    one = triton_client.infer("echo", [_input("x", np.array([b"\xff only"], dtype=np.object_), "BYTES")])
    assert list(one.as_numpy("output0")) == [b"\xff only"]


# ---------------------------------------------------------------------------- inputs and outputs


def test_inputs_are_positional_and_a_tuple_is_numbered_outputs(triton_client: triton.InferenceServerClient) -> None:
    first, second, third = (np.full((2,), value, np.float32) for value in (1, 2, 3))
    inputs = [_input(name, array, "FP32") for name, array in zip(("c", "a", "b"), (first, second, third), strict=True)]
    result = triton_client.infer("many", inputs)
    assert [output.name for output in result.get_response().outputs] == ["output0", "output1", "output2"]
    for index, array in enumerate((first, second, third)):
        assert (result.as_numpy(f"output{index}") == array).all()
    picked = triton_client.infer(
        "many", inputs, outputs=[triton.InferRequestedOutput("output2"), triton.InferRequestedOutput("output0")]
    )
    assert [output.name for output in picked.get_response().outputs] == ["output2", "output0"]
    assert (picked.as_numpy("output2") == third).all()


def test_declared_inputs_are_matched_by_name_and_a_dict_keeps_its_keys(
    triton_client: triton.InferenceServerClient,
) -> None:
    image = np.arange(6, dtype=np.float32).reshape(3, 2)
    label = np.array([4, 5, 6], dtype=np.int64)
    # Given in the other order: matched by name (keyword arguments), not by position.
    result = triton_client.infer("declared", [_input("label", label, "INT64"), _input("image", image, "FP32")])
    assert sorted(output.name for output in result.get_response().outputs) == ["image", "label"]
    assert (result.as_numpy("image") == image).all() and (result.as_numpy("label") == label).all()


def test_declared_output_names_a_tensor_result(triton_client: triton.InferenceServerClient) -> None:
    x = np.array([1.5, -2.0], dtype=np.float32)
    result = triton_client.infer("scaled", [_input("x", x, "FP32")])
    assert (result.as_numpy("doubled") == x * 2).all()


def test_typed_contents_in_and_out(stub: v2_grpc.GRPCInferenceServiceStub) -> None:
    request = v2.ModelInferRequest(model_name="many", id="req-7")
    request.inputs.add(name="a", datatype="INT32", shape=[2, 2]).contents.int_contents.extend([1, -2, 3, 2**31 - 1])
    request.inputs.add(name="b", datatype="BOOL", shape=[3]).contents.bool_contents.extend([True, False, True])
    request.inputs.add(name="c", datatype="FP64", shape=[1]).contents.fp64_contents.append(0.1)
    request.inputs.add(name="d", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"x", b"yz"])
    response = stub.ModelInfer(request, timeout=30)
    assert response.id == "req-7" and not response.raw_output_contents
    a, b, c, d = response.outputs
    assert (a.datatype, list(a.shape), list(a.contents.int_contents)) == ("INT32", [2, 2], [1, -2, 3, 2**31 - 1])
    assert (b.datatype, list(b.contents.bool_contents)) == ("BOOL", [True, False, True])
    assert (c.datatype, list(c.contents.fp64_contents)) == ("FP64", [0.1])
    assert (d.datatype, list(d.shape), list(d.contents.bytes_contents)) == ("BYTES", [2], [b"x", b"yz"])


def test_typed_request_with_an_fp16_result_is_answered_raw(stub: v2_grpc.GRPCInferenceServiceStub) -> None:
    request = v2.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="FP16", shape=[2])
    request.raw_input_contents.append(np.array([1.5, 2.0], np.float16).tobytes())
    response = stub.ModelInfer(request, timeout=30)
    assert np.frombuffer(response.raw_output_contents[0], np.float16).tolist() == [1.5, 2.0]
    typed = v2.ModelInferRequest(model_name="echo")
    typed.inputs.add(name="x", datatype="FP16", shape=[1])
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(typed, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in error.value.details() and "raw_input_contents" in error.value.details()


def test_a_large_tensor_takes_the_shared_memory_route(triton_client: triton.InferenceServerClient) -> None:
    big = np.random.default_rng(3).standard_normal((1024, 1024), dtype=np.float32)  # 4 MiB
    result = triton_client.infer("echo", [_input("x", big, "FP32")])
    assert result.as_numpy("output0").tobytes() == big.tobytes()


def test_version_pinned_by_number(triton_client: triton.InferenceServerClient) -> None:
    x = np.ones((1, 1, 10, 10), np.float32)
    assert triton_client.infer("seed", [_input("input0", x, "FP32")], model_version="1").as_numpy("output0") is not None
    with pytest.raises(InferenceServerException) as missing:
        triton_client.infer("seed", [_input("input0", x, "FP32")], model_version="9")
    assert _status(missing) == "StatusCode.NOT_FOUND" and "version 9" in str(missing.value)
    with pytest.raises(InferenceServerException) as bad:
        triton_client.infer("seed", [_input("input0", x, "FP32")], model_version="latest")
    assert _status(bad) == "StatusCode.INVALID_ARGUMENT"


# ---------------------------------------------------------------------------- errors


def test_unknown_model_is_not_found(triton_client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as error:
        triton_client.infer("no-such-model", [_input("x", np.zeros(1, np.float32), "FP32")])
    assert _status(error) == "StatusCode.NOT_FOUND" and "no-such-model" in str(error.value)


@pytest.mark.parametrize(
    ("model", "inputs", "words"),
    [
        ("declared", [("image", np.zeros((3, 2), np.float64), "FP64")], ["'image'", "FP64", "declares FP32"]),
        ("declared", [("image", np.zeros((3, 5), np.float32), "FP32")], ["'image'", "shape [3, 5]"]),
        ("declared", [("image", np.zeros((1, 2), np.float32), "FP32")], ["missing input", "'label'"]),
        ("declared", [("other", np.zeros(1, np.float32), "FP32")], ["'other'", "no such input"]),
        ("echo", [("x", np.zeros(2, np.uint16), "UINT16")], ["'x'", "'UINT16' is not supported"]),
        ("many", [], ["None", "no tensor form"]),
        ("complex", [("x", np.zeros(2, np.float32), "FP32")], ["complex64", "no datatype"]),
    ],
    ids=["datatype", "shape", "missing", "unknown-input", "unsupported", "no-tensor-form", "complex"],
)
def test_bad_requests_are_invalid_argument_saying_what(
    triton_client: triton.InferenceServerClient, model: str, inputs: list[tuple[str, np.ndarray, str]], words: list[str]
) -> None:
    with pytest.raises(InferenceServerException) as error:
        triton_client.infer(model, [_input(name, array, datatype) for name, array, datatype in inputs])
    assert _status(error) == "StatusCode.INVALID_ARGUMENT", str(error.value)
    for word in words:
        assert word in str(error.value)


def test_raw_contents_of_the_wrong_size(stub: v2_grpc.GRPCInferenceServiceStub) -> None:
    request = v2.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="FP32", shape=[4])
    request.raw_input_contents.append(b"\0" * 12)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "input 'x': FP32 of shape [4] needs 16 bytes of raw contents, got 12"


def test_unknown_requested_output(triton_client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as error:
        triton_client.infer(
            "echo", [_input("x", np.zeros(1, np.float32), "FP32")], outputs=[triton.InferRequestedOutput("y")]
        )
    assert _status(error) == "StatusCode.INVALID_ARGUMENT" and "'y'" in str(error.value)


def test_a_request_that_does_not_parse(v2_daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(v2_daemon.target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as error:
            call(b"\x0a\x02\xff\xfe", timeout=30)  # model_name: bytes that are not UTF-8
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelInferRequest" in error.value.details()


# ---------------------------------------------------------------------------- model repository


def test_repository_index_unload_and_load(triton_client: triton.InferenceServerClient) -> None:
    index = {model.name: model for model in triton_client.get_model_repository_index().models}
    assert index["seed"].state == "READY" and index["seed"].version == "1"
    triton_client.unload_model("complex")
    assert not triton_client.is_model_ready("complex")
    index = {model.name: model for model in triton_client.get_model_repository_index().models}
    assert index["complex"].state == "UNAVAILABLE"
    triton_client.load_model("complex")
    assert triton_client.is_model_ready("complex")
    assert len(triton_client.get_model_metadata("complex").versions) == 1


def test_load_a_new_model_by_name_with_its_entry(triton_client: triton.InferenceServerClient) -> None:
    config = json.dumps({"package": "models.pt", "pickle": "models:scale.pkl"})
    triton_client.load_model("scaler", config=config)
    try:
        result = triton_client.infer("scaler", [_input("x", np.array([3.0], np.float32), "FP32")])
        assert result.as_numpy("output0").tolist() == [6.0]
        assert "scaler" in {model.name for model in triton_client.get_model_repository_index().models}
    finally:
        triton_client.unload_model("scaler")
    assert not triton_client.is_model_ready("scaler")
    with pytest.raises(InferenceServerException) as unknown:
        triton_client.load_model("not-in-the-repository")
    assert _status(unknown) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as bad:
        triton_client.load_model("bad", config=json.dumps({"package": "models.pt", "pickle": "no colon"}))
    assert _status(bad) == "StatusCode.INVALID_ARGUMENT" and "module:file" in str(bad.value)


def test_auth_applies_to_v2(package_dir: Path, tmp_path: Path) -> None:
    config = _config(
        tmp_path / "config.yaml", package_dir, auth={"admin_tokens": ["root-token"], "invoke_tokens": ["call-token"]}
    )
    process = DaemonProcess(config).start()
    try:
        nobody = triton.InferenceServerClient(process.target)
        with pytest.raises(InferenceServerException) as anonymous:
            nobody.is_model_ready("seed")
        assert _status(anonymous) == "StatusCode.UNAUTHENTICATED"
        caller = {"authorization": "Bearer call-token"}
        assert nobody.is_model_ready("seed", headers=caller)
        x = np.ones((1, 1, 10, 10), np.float32)
        assert nobody.infer("seed", [_input("input0", x, "FP32")], headers=caller).as_numpy("output0") is not None
        for admin_only in (nobody.unload_model, nobody.load_model):
            with pytest.raises(InferenceServerException) as denied:
                admin_only("seed", headers=caller)
            assert _status(denied) == "StatusCode.PERMISSION_DENIED"
        with pytest.raises(InferenceServerException) as index_denied:
            nobody.get_model_repository_index(headers=caller)
        assert _status(index_denied) == "StatusCode.PERMISSION_DENIED"
        nobody.unload_model("seed", headers={"authorization": "Bearer root-token"})
        assert not nobody.is_model_ready("seed", headers=caller)
        nobody.close()
    finally:
        process.assert_clean_stop()
