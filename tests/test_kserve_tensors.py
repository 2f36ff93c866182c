"""The KServe v2 tensor codec as a unit: what a real daemon's answers make slow to reach."""

from __future__ import annotations

import re
import struct
from typing import Any

import pytest
from tritonclient.grpc import service_pb2 as v2  # not deployd_wire/proto's: see test_kserve_v2.py

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


# Shapes both protocols refuse, through the one check (server.api.values.check_shape), each
# with its own protocol's message: (shape, deployd.v1 message, KServe v2 message).
_LIMITS = ValueLimits(max_tensor_rank=3, max_tensor_elements=100)
_REFUSED_SHAPES = [
    (
        [1, 1, 1, 1],
        "a tensor of 4 dimensions, over the limit of 3 (limits.max_tensor_rank)",
        "input 'x' has 4 dimensions, over the limit of 3 (limits.max_tensor_rank)",
    ),
    ([2, -1], "tensor shape [2, -1] has a negative size", "input 'x': shape [2, -1] has a negative size"),
    (
        [0, 2**31, 2**31],
        "tensor shape [0, 2147483648, 2147483648] is too large: its sizes overflow int64",
        "input 'x': shape [0, 2147483648, 2147483648] is too large: its sizes overflow int64",
    ),
    (
        [11, 10],
        "a tensor of shape [11, 10] has 110 elements, over the limit of 100 (limits.max_tensor_elements)",
        "input 'x': shape [11, 10] has 110 elements, over the limit of 100 (limits.max_tensor_elements)",
    ),
]


@pytest.mark.parametrize(("shape", "v1_message", "v2_message"), _REFUSED_SHAPES)
def test_both_protocols_refuse_the_same_shapes_through_one_check(
    monkeypatch: pytest.MonkeyPatch, shape: list[int], v1_message: str, v2_message: str
) -> None:
    import server.api.kserve_tensors as kserve_tensors
    import server.api.values as values
    from deployd_wire.proto import deployd_pb2 as pb
    from server.errors import InvalidValue

    checked: list[list[int]] = []
    real = values.check_shape

    def spy(shape: list[int], *args: Any, **kwargs: Any) -> int:
        checked.append(list(shape))
        return real(shape, *args, **kwargs)

    monkeypatch.setattr(values, "check_shape", spy)
    monkeypatch.setattr(kserve_tensors, "check_shape", spy)

    tensor = pb.Value(tensor_value=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape))
    with pytest.raises(InvalidValue) as v1_error:
        values.unpack_value(tensor, [], _LIMITS)
    assert str(v1_error.value) == v1_message

    with pytest.raises(InvalidArgument) as v2_error:
        decode_inputs(_request("FP32", shape, b""), (), _LIMITS)
    assert type(v2_error.value) is InvalidArgument  # not InvalidValue: v2 keeps its class
    assert str(v2_error.value) == v2_message
    with pytest.raises(InvalidArgument, match="^" + re.escape(v2_message) + "$"):
        kserve_tensors.check_tensor("x", "FP32", shape, _LIMITS)

    assert checked == [shape, shape, shape]


def test_bytes_shapes_keep_their_own_limits() -> None:
    limits = ValueLimits(max_container_items=10)
    with pytest.raises(InvalidArgument, match=r"^input 'x': BYTES of shape \[11, 0\] makes 11 lists, over the limit"):
        decode_inputs(_request(BYTES, [11, 0], b""), (), limits)
    with pytest.raises(
        InvalidArgument,
        match=re.escape("input 'x': shape [1, 11] has 11 elements, over the limit of 10 (limits.max_container_items)"),
    ):
        decode_inputs(_request(BYTES, [1, 11], b""), (), limits)
