"""The KServe v2 tensor codec as a unit: what a real daemon's answers make slow to reach."""

from __future__ import annotations

import struct

import pytest
from tritonclient.grpc import service_pb2 as v2  # not server/proto's: see test_kserve_v2.py

from server.api.kserve_tensors import BYTES, decode_inputs, fill_response, result_outputs
from server.api.values import ValueLimits
from server.errors import InvalidArgument
from server.models.entry import TensorSpec


def _raw_bytes(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _request(datatype: str, shape: list[int], raw: bytes) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def test_bytes_nest_by_shape() -> None:
    decoded = decode_inputs(_request(BYTES, [2, 2], _raw_bytes(b"a", b"b", b"c", b"d")), (), ValueLimits())
    assert decoded.args == [[[b"a", b"b"], [b"c", b"d"]]]
    assert decode_inputs(_request(BYTES, [1], _raw_bytes(b"only")), (), ValueLimits()).args == [b"only"]


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (_raw_bytes(b"a"), "needs 2 length-prefixed elements"),
        (_raw_bytes(b"a", b"b") + b"\0", "needs 2 length-prefixed elements"),
        (struct.pack("<I", 99) + b"short", "runs past the end"),
    ],
)
def test_malformed_raw_bytes(raw: bytes, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        decode_inputs(_request(BYTES, [2], raw), (), ValueLimits())


def test_typed_values_that_do_not_fit() -> None:
    request = v2.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    with pytest.raises(InvalidArgument, match="does not fit in INT8"):
        decode_inputs(request, (), ValueLimits())


def test_limits_apply_to_v2_inputs() -> None:
    with pytest.raises(InvalidArgument, match=r"limits\.max_tensor_elements"):
        decode_inputs(_request("FP32", [1000, 1000], b""), (), ValueLimits(max_tensor_elements=1000))
    with pytest.raises(InvalidArgument, match=r"limits\.max_tensor_rank"):
        decode_inputs(_request("FP32", [1] * 5, b""), (), ValueLimits(max_tensor_rank=4))
    with pytest.raises(InvalidArgument, match="negative size"):
        decode_inputs(_request("FP32", [-1], b""), (), ValueLimits())


def test_declared_shapes_accept_any_size_where_minus_one() -> None:
    declared = (TensorSpec("x", "UINT8", (-1, 3)),)
    decoded = decode_inputs(_request("UINT8", [2, 3], bytes(6)), declared, ValueLimits())
    assert decoded.kwargs == {"x": ("tensor", "uint8", [2, 3], 0)}
    with pytest.raises(InvalidArgument, match="declares"):
        decode_inputs(_request("UINT8", [2, 4], bytes(8)), declared, ValueLimits())


def test_scalars_and_text_have_a_tensor_form() -> None:
    outputs = result_outputs(("tuple", [True, 7, 0.5, "é", [b"a", "b"]]), [], ())
    assert [(o.name, o.datatype, o.shape) for o in outputs] == [
        ("output0", "BOOL", []),
        ("output1", "INT64", []),
        ("output2", "FP64", []),
        ("output3", "BYTES", [1]),
        ("output4", "BYTES", [2]),
    ]
    response = v2.ModelInferResponse()
    fill_response(outputs, raw=False, response=response)
    assert list(response.outputs[1].contents.int64_contents) == [7]
    assert list(response.outputs[3].contents.bytes_contents) == ["é".encode()]


def test_nested_results_have_no_tensor_form() -> None:
    with pytest.raises(InvalidArgument, match="'output0' is a dict"):
        result_outputs(("tuple", [{"a": 1}]), [], ())
