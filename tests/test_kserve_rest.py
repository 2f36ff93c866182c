"""The KServe v2 REST body codec (server.api.kserve_rest) as a unit: JSON and binary tensor data
both ways for every datatype, the errors a hostile or careless body meets, and tritonclient.http's
own request builder and response reader on the other side."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.api.kserve_rest import (
    RequestedOutput,
    RestInferRequest,
    encode_infer_response,
    error_body,
    parse_header_length,
    parse_infer_request,
)
from server.api.kserve_tensors import SUPPORTED, DecodedInputs, Output, decode_tensors
from server.api.values import ValueLimits
from server.errors import InvalidArgument
from server.models.entry import TensorSpec

LIMITS = ValueLimits()
NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BF16": ml_dtypes.bfloat16,
}
# Values of each datatype (4 of them, for shapes [4] and [2, 2]), reaching its edges.
VALUES: dict[str, list[Any]] = {
    "BOOL": [True, False, False, True],
    "UINT8": [0, 1, 254, 255],
    "INT8": [-128, -1, 0, 127],
    "INT16": [-(2**15), -1, 7, 2**15 - 1],
    "INT32": [-(2**31), 0, 12345, 2**31 - 1],
    "INT64": [-(2**63), -1, 2**53 + 1, 2**63 - 1],
    "FP16": [1.5, -0.0, 65504.0, 6e-08],
    "FP32": [0.1, -3.4028234663852886e38, 1.401298464324817e-45, 7],
    "FP64": [0.1, -1.7976931348623157e308, 5e-324, 2**60],
    "BF16": [1.0, 3.1, -2.5e38, 9.2e-41],
}


def expected_bytes(datatype: str, values: list[Any]) -> bytes:
    """Little-endian bytes as numpy makes them (BF16: float32 first, then rounded, as torch)."""
    if datatype == "BF16":
        return np.array(values, np.float32).astype(ml_dtypes.bfloat16).tobytes()
    return np.array(values, NUMPY[datatype]).astype(np.dtype(NUMPY[datatype]).newbyteorder("<")).tobytes()


def length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def json_body(inputs: list[dict[str, Any]], **top: Any) -> bytes:
    return json.dumps({"inputs": inputs, **top}).encode()


def binary_body(request: dict[str, Any], *blobs: bytes) -> tuple[bytes, int]:
    header = json.dumps(request).encode()
    return header + b"".join(blobs), len(header)


def decode(body: bytes, header_length: int | None = None, declared: tuple[TensorSpec, ...] = ()) -> DecodedInputs:
    return decode_tensors(parse_infer_request(body, header_length, LIMITS).inputs, declared, LIMITS)


def raw_of(decoded: DecodedInputs, position: int = 0) -> bytes:
    packed = decoded.args[position]
    assert packed[0] == "tensor"
    return bytes(decoded.buffers[packed[3]])


def nest(flat: list[Any], shape: list[int]) -> Any:
    if len(shape) <= 1:
        return flat
    size = math.prod(shape[1:])
    return [nest(flat[row * size : (row + 1) * size], shape[1:]) for row in range(shape[0])]


def refused(body: bytes, header_length: int | None = None, limits: ValueLimits = LIMITS) -> str:
    with pytest.raises(InvalidArgument) as info:
        request = parse_infer_request(body, header_length, limits)
        decode_tensors(request.inputs, (), limits)
    return str(info.value)


# ---------------------------------------------------------------------------- every datatype, both ways


@pytest.mark.parametrize("datatype", sorted(VALUES))
def test_json_data_flat_and_nested_and_binary_data_make_the_same_bytes(datatype: str) -> None:
    values = VALUES[datatype]
    want = expected_bytes(datatype, values)
    flat = json_body([{"name": "x", "datatype": datatype, "shape": [2, 2], "data": values}])
    nested = json_body([{"name": "x", "datatype": datatype, "shape": [2, 2], "data": [values[:2], values[2:]]}])
    size = {"binary_data_size": len(want)}
    binary = binary_body({"inputs": [{"name": "x", "datatype": datatype, "shape": [2, 2], "parameters": size}]}, want)
    for body, header_length in [(flat, None), (nested, None), binary]:
        decoded = decode(body, header_length)
        assert decoded.args[0][:3] == ("tensor", np.dtype(NUMPY[datatype]).name, [2, 2])
        assert raw_of(decoded) == want


def test_the_binary_path_takes_views_of_the_body() -> None:
    data = np.arange(6, dtype=np.float32).tobytes()
    body, header_length = binary_body(
        {
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
                {"name": "j", "datatype": "INT8", "shape": [1], "data": [5]},
                {"name": "b", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}},
            ]
        },
        data,
    )
    request = parse_infer_request(body, header_length, LIMITS)
    a, j, b = request.inputs
    assert type(a.raw) is memoryview and a.raw.obj is body and bytes(a.raw) == data[:8]
    assert type(b.raw) is memoryview and bytes(b.raw) == data[8:]
    assert j.raw == b"\x05"
    decoded = decode_tensors(request.inputs, (), LIMITS)
    assert type(decoded.buffers[0]) is memoryview and bytes(decoded.buffers[0]) == data[:8]  # no copy


def test_bytes_in_json_and_binary() -> None:
    items = ["héllo", "", "x" * 300, "\u2603"]
    encoded = [item.encode() for item in items]
    as_json = json_body([{"name": "s", "datatype": "BYTES", "shape": [2, 2], "data": [items[:2], items[2:]]}])
    assert decode(as_json).args == [[encoded[:2], encoded[2:]]]
    raw = length_prefixed([b"\xff\x00", b"", b"abc"])
    body, header_length = binary_body(
        {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(raw)}}]},
        raw,
    )
    decoded = decode(body, header_length)
    assert decoded.args == [[b"\xff\x00", b"", b"abc"]]
    assert all(type(item) is bytes for item in decoded.args[0])  # not views of the body
    one = json_body([{"name": "s", "datatype": "BYTES", "shape": [1], "data": ["only"]}])
    assert decode(one).args == [b"only"]


def test_scalars_empty_tensors_and_names() -> None:
    decoded = decode(
        json_body(
            [
                {"name": "", "datatype": "FP64", "shape": [], "data": [2.5]},
                {"name": "", "datatype": "INT32", "shape": [0, 3], "data": []},
                {"name": "", "datatype": "INT32", "shape": [2, 0], "data": [[], []]},
                {"name": "", "datatype": "BYTES", "shape": [0], "data": []},
            ]
        )
    )
    assert [signature.name for signature in decoded.seen] == ["input0", "input1", "input2", "input3"]
    assert raw_of(decoded, 0) == struct.pack("<d", 2.5)
    assert raw_of(decoded, 1) == raw_of(decoded, 2) == b""
    assert decoded.args[3] == []


def test_declared_inputs_and_the_request_fields() -> None:
    body = json.dumps(
        {
            "id": "call-7",
            "model_name": "ignored, as KServe's client sends it",
            "parameters": {"binary_data_output": True, "priority": 3, "content_type": "np"},
            "inputs": [
                {"name": "b", "datatype": "INT64", "shape": [1], "data": [1], "parameters": {"content_type": "np"}},
                {"name": "a", "datatype": "BYTES", "shape": [1], "data": ["x"]},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
        }
    ).encode()
    request = parse_infer_request(body, None, LIMITS)
    assert (request.id, request.binary_output) == ("call-7", True)
    assert request.outputs == [RequestedOutput("y", False), RequestedOutput("z", None)]
    declared = (TensorSpec("a", "BYTES", (-1,)), TensorSpec("b", "INT64", (1,)))
    decoded = decode_tensors(request.inputs, declared, LIMITS)
    assert decoded.kwargs == {"b": ("tensor", "int64", [1], 0), "a": b"x"}
    with pytest.raises(InvalidArgument, match="the model declares INT32"):
        decode_tensors(request.inputs, (TensorSpec("b", "INT32", (1,)), TensorSpec("a", "BYTES", (1,))), LIMITS)


def test_values_past_a_float_range_round_to_infinity() -> None:
    body = json_body(
        [
            {"name": "h", "datatype": "FP16", "shape": [4], "data": [1e6, -65520, 65519, 10**30]},
            {"name": "f", "datatype": "FP32", "shape": [2], "data": [1e39, -(10**39)]},
            {"name": "b", "datatype": "BF16", "shape": [3], "data": [1e39, float("nan"), float("-inf")]},
        ]
    )
    decoded = decode(body)
    assert raw_of(decoded, 0) == struct.pack("<4H", 0x7C00, 0xFC00, 0x7BFF, 0x7C00)
    assert raw_of(decoded, 1) == struct.pack("<2I", 0x7F800000, 0xFF800000)
    assert raw_of(decoded, 2) == struct.pack("<3H", 0x7F80, 0x7FC0, 0xFF80)


def test_bf16_rounds_to_nearest_even() -> None:
    # float32 bits -> bfloat16: ties go to the even neighbour.
    cases = {0x3F808000: 0x3F80, 0x3F818000: 0x3F82, 0x3F808001: 0x3F81, 0x7F7FFFFF: 0x7F80, 0x00000001: 0x0000}
    floats = [struct.unpack("<f", struct.pack("<I", bits))[0] for bits in cases]
    decoded = decode(json_body([{"name": "b", "datatype": "BF16", "shape": [len(cases)], "data": floats}]))
    assert raw_of(decoded) == struct.pack(f"<{len(cases)}H", *cases.values())


# ---------------------------------------------------------------------------- responses


def outputs_of(datatype: str) -> Output:
    return Output("y", datatype, [2, 2], expected_bytes(datatype, VALUES[datatype]))


@pytest.mark.parametrize("datatype", sorted(VALUES))
def test_outputs_as_json_data_and_as_binary(datatype: str) -> None:
    output = outputs_of(datatype)
    plain = RestInferRequest("", [], [], False)
    body, header_length = encode_infer_response("m", "3", "", [output], plain)
    assert header_length is None
    response = json.loads(body)
    assert response == {
        "model_name": "m",
        "model_version": "3",
        "outputs": [{"name": "y", "datatype": datatype, "shape": [2, 2], "data": response["outputs"][0]["data"]}],
    }
    data = response["outputs"][0]["data"]
    assert all(type(value) is (bool if datatype == "BOOL" else int if "INT" in datatype else float) for value in data)
    assert expected_bytes(datatype, data) == output.data
    body, header_length = encode_infer_response("m", "3", "r", [output], plain._replace(binary_output=True))
    assert header_length is not None
    header = json.loads(body[:header_length])
    assert header["id"] == "r"
    assert header["outputs"][0]["parameters"] == {"binary_data_size": len(output.data)}
    assert "data" not in header["outputs"][0]
    assert body[header_length:] == output.data


def test_each_output_may_ask_for_binary_or_json() -> None:
    outputs = [outputs_of("FP32"), Output("t", "BYTES", [2], [b"ab", b"\xffz"]), outputs_of("INT8")._replace(name="i")]
    request = RestInferRequest("", [], [RequestedOutput("t", True), RequestedOutput("i", False)], True)
    body, header_length = encode_infer_response("m", "1", "", outputs, request)
    assert header_length is not None
    header = json.loads(body[:header_length])
    assert [("data" in tensor, tensor.get("parameters")) for tensor in header["outputs"]] == [
        (False, {"binary_data_size": 16}),
        (False, {"binary_data_size": 12}),
        (True, None),
    ]
    assert body[header_length:] == outputs[0].data + length_prefixed([b"ab", b"\xffz"])


def test_bytes_outputs_as_strings_and_non_utf8_refused() -> None:
    request = RestInferRequest("", [], [], False)
    body, _ = encode_infer_response("m", "1", "", [Output("t", "BYTES", [2], [b"h\xc3\xa9", b""])], request)
    assert json.loads(body)["outputs"][0]["data"] == ["hé", ""]
    with pytest.raises(InvalidArgument) as info:
        encode_infer_response("m", "1", "", [Output("t", "BYTES", [2], [b"ok", b"\xff"])], request)
    assert str(info.value) == (
        "output 't': element 1 is not UTF-8 text, which JSON data cannot carry: ask for the output as binary"
        ' data ("parameters": {"binary_data": true} on the output, or "binary_data_output": true on the request)'
    )


def test_non_finite_floats_are_written_as_nan_and_infinity() -> None:
    output = Output("y", "FP32", [3], struct.pack("<3f", math.nan, math.inf, -math.inf))
    body, _ = encode_infer_response("m", "1", "", [output], RestInferRequest("", [], [], False))
    assert b'"data":[NaN,Infinity,-Infinity]' in body


def test_error_body_and_header_length() -> None:
    assert json.loads(error_body('bad "x" \u2603')) == {"error": 'bad "x" \u2603'}
    assert parse_header_length(None) is None
    assert parse_header_length(" 12 ") == 12
    for text in ["", "-1", "1e3", "0x10", "9" * 19]:
        with pytest.raises(InvalidArgument, match=r"Inference-Header-Content-Length .* is not a number of bytes"):
            parse_header_length(text)


# ---------------------------------------------------------------------------- refused, with their messages

X = {"name": "x", "datatype": "INT32", "shape": [2]}


def with_x(**fields: Any) -> bytes:
    return json_body([{**X, **fields}])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "the request's JSON is not valid: Expecting property name enclosed in double quotes: line 1 column 2"),
        (b'{"inputs": "\xff"}', "the request's JSON is not UTF-8 (byte 12: invalid start byte)"),
        (b"[" * 100_000 + b"]" * 100_000, "the request's JSON is nested too deeply"),
        (
            b'{"inputs": [{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
            "the request's JSON is nested too deeply",
        ),
        (b"[]", "the request body must be a JSON object, not a list"),
        (b"{}", 'the request has no "inputs"'),
        (b'{"inputs": {}}', '"inputs" must be a list, not an object'),
        (b'{"inputs": [], "id": 7}', '"id" must be a string, not a number'),
        (b'{"inputs": [], "parameters": []}', "the request: parameters must be a JSON object, not a list"),
        (
            b'{"inputs": [], "parameters": {"binary_data_output": 1}}',
            "parameters.binary_data_output must be true or false, not a number",
        ),
        (b'{"inputs": [], "outputs": "y"}', '"outputs" must be a list, not a string'),
        (b'{"inputs": [1]}', "inputs[0] must be a JSON object, not a number"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32"}]}', 'inputs[0] has no "shape"'),
        (
            b'{"inputs": [{"name": 1, "datatype": "FP32", "shape": []}]}',
            "inputs[0].name must be a string, not a number",
        ),
        (with_x(datatype=None), "input 'x': datatype must be a string, not null"),
        (with_x(shape="2"), "input 'x': shape must be a list of integers, not a string"),
        (with_x(shape=[2, True]), "input 'x': shape must be a list of integers, not a list holding true"),
        (with_x(shape=[2.0]), "input 'x': shape must be a list of integers, not a list holding 2.0"),
        (with_x(shape=[-1], data=[]), "input 'x': shape [-1] has a negative size"),
        (
            with_x(datatype="UINT16", data=[1, 2]),
            f"input 'x': datatype 'UINT16' is not supported (one of: {', '.join(SUPPORTED)})",
        ),
        (with_x(data=[1, 2], parameters=[]), "input 'x': parameters must be a JSON object, not a list"),
        (with_x(), "input 'x' has neither data nor parameters.binary_data_size"),
        (
            with_x(data=[1, 2], parameters={"binary_data_size": 8}),
            "input 'x' has both data and parameters.binary_data_size: one or the other",
        ),
        (
            with_x(parameters={"binary_data_size": 8}),
            "input 'x' has parameters.binary_data_size, but the request has no Inference-Header-Content-Length"
            " header to say where the JSON ends",
        ),
        (
            with_x(parameters={"shared_memory_region": "r", "shared_memory_byte_size": 8}),
            "input 'x': shared memory (parameters.shared_memory_region) is not supported: send the data in the body",
        ),
        (with_x(data=3), "input 'x': data must be a list, not a number"),
        (with_x(data=[1, 2, 3]), "input 'x': data has 3 values, shape [2] needs 2"),
        (with_x(data=[[1], [2]]), "input 'x': INT32 data must be integers, found a list"),
        (with_x(data=[1, True]), "input 'x': INT32 data must be integers, found true"),
        (with_x(data=[1, 1.0]), "input 'x': INT32 data must be integers, found 1.0"),
        (with_x(data=[1, None]), "input 'x': INT32 data must be integers, found null"),
        (with_x(data=[1, "1"]), "input 'x': INT32 data must be integers, found a string"),
        (with_x(data=[1, 2**31]), "input 'x': a value in data does not fit in INT32 (-2147483648..2147483647)"),
        (with_x(datatype="INT8", data=[-129, 0]), "input 'x': a value in data does not fit in INT8 (-128..127)"),
        (with_x(datatype="UINT8", data=[-1, 0]), "input 'x': a value in data does not fit in UINT8 (0..255)"),
        (
            with_x(datatype="INT64", data=[2**63, 0]),
            "input 'x': a value in data does not fit in INT64 (-9223372036854775808..9223372036854775807)",
        ),
        (with_x(datatype="BOOL", data=[True, 1]), "input 'x': BOOL data must be true or false, found 1"),
        (with_x(datatype="FP32", data=[1.5, False]), "input 'x': FP32 data must be numbers, found false"),
        (with_x(datatype="FP16", data=[1.5, "1"]), "input 'x': FP16 data must be numbers, found a string"),
        (with_x(datatype="BF16", data=[1.5, {}]), "input 'x': BF16 data must be numbers, found an object"),
        (with_x(datatype="FP64", data=[1.5, 10**400]), "input 'x': a value in data does not fit in FP64"),
        (with_x(datatype="FP16", data=[1.5, 10**400]), "input 'x': a value in data does not fit in FP16"),
        (with_x(datatype="BF16", data=[1.5, 10**400]), "input 'x': a value in data does not fit in BF16"),
        (with_x(datatype="BYTES", data=["a", 1]), "input 'x': BYTES data must be strings, found 1"),
        (
            with_x(datatype="BYTES", data=["a", "\ud800"]),
            "input 'x': a string in data is not valid Unicode (a lone surrogate)",
        ),
        (b'{"inputs": [], "outputs": [{}]}', 'outputs[0] has no "name"'),
        (b'{"inputs": [], "outputs": [{"name": null}]}', "outputs[0].name must be a string, not null"),
        (
            b'{"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}',
            "output 'y': parameters.binary_data must be true or false, not a string",
        ),
        (
            b'{"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": 3}}]}',
            "output 'y': classification (parameters.classification) is not supported",
        ),
        (
            b'{"inputs": [], "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r"}}]}',
            "output 'y': shared memory (parameters.shared_memory_region) is not supported: send the data in the body",
        ),
    ],
)
def test_refused_json(body: bytes, message: str) -> None:
    assert refused(body).startswith(message)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([[1, 2, 3], [4, 5, 6]], "data does not match shape [3, 2]: a list at dimension 0 has 2 items, not 3"),
        ([[1, 2], [3, 4], [5]], "data does not match shape [3, 2]: a list at dimension 1 has 1 items, not 2"),
        ([[1, 2], [3, 4], 5], "data nested as shape [3, 2] needs lists at dimension 1, found 5"),
        ([[1, 2], [3, 4], [5, [6]]], "INT32 data must be integers, found a list"),
        ([[[1], [2]], [[3], [4]], [[5], [6]]], "INT32 data must be integers, found a list"),
    ],
)
def test_nested_data_must_match_the_shape(data: list[Any], message: str) -> None:
    assert refused(with_x(shape=[3, 2], data=data)) == f"input 'x': {message}"


def test_shape_and_limits_are_checked_before_the_data() -> None:
    """A huge shape or an over-deep one is refused by the shape alone, whatever the data holds."""
    limits = ValueLimits(max_tensor_rank=4, max_tensor_elements=1000, max_container_items=10)
    huge = with_x(shape=[10**6, 10**6], data=[[0] * 3] * 3)
    assert refused(huge, limits=limits) == (
        "input 'x': shape [1000000, 1000000] has 1000000000000 elements, over the limit of 1000"
        " (limits.max_tensor_elements)"
    )
    deep = with_x(shape=[1] * 5, data=[[[[[1]]]]])
    assert refused(deep, limits=limits) == "input 'x' has 5 dimensions, over the limit of 4 (limits.max_tensor_rank)"
    strings = with_x(datatype="BYTES", shape=[11], data=["a"] * 11)
    assert refused(strings, limits=limits) == (
        "input 'x': shape [11] has 11 elements, over the limit of 10 (limits.max_container_items)"
    )
    overflow = with_x(shape=[2**62, 2**62], data=[])
    assert "too large: its sizes overflow int64" in refused(overflow)


def test_binary_sizes_must_add_up() -> None:
    def body(*sizes: int, blob: bytes) -> tuple[bytes, int]:
        inputs = [
            {"name": f"in{i}", "datatype": "UINT8", "shape": [size], "parameters": {"binary_data_size": size}}
            for i, size in enumerate(sizes)
        ]
        return binary_body({"inputs": inputs}, blob)

    payload, header_length = body(4, 4, blob=bytes(7))
    assert refused(payload, header_length) == (
        f"the body has 7 bytes after its {header_length} bytes of JSON, but the inputs'"
        " parameters.binary_data_size add up to 8"
    )
    payload, header_length = body(4, blob=bytes(5))
    assert refused(payload, header_length).startswith(f"the body has 5 bytes after its {header_length} bytes")
    assert refused(*body(blob=b"x")) == (
        "the body has 1 bytes after its 14 bytes of JSON, but the inputs' parameters.binary_data_size add up to 0"
    )
    payload, header_length = body(4, blob=bytes(4))
    assert (
        refused(payload, len(payload) + 1)
        == f"Inference-Header-Content-Length is {len(payload) + 1}, but the body has {len(payload)} bytes"
    )
    assert refused(payload, -1).startswith("Inference-Header-Content-Length is -1")
    assert refused(payload, header_length - 1).startswith("the request's JSON is not valid")
    size_lies = binary_body(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}]},
        bytes(4),
    )
    assert refused(*size_lies) == "input 'x': FP32 of shape [2] needs 8 bytes of raw contents, got 4"
    bad_size = binary_body(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": -8}}]}
    )
    assert refused(*bad_size) == "input 'x': parameters.binary_data_size must be a number of bytes, not -8"
    bad_bytes = length_prefixed([b"abc"])[:-1]
    short = binary_body(
        {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]},
        bad_bytes,
    )
    assert refused(*short) == "input 's': a BYTES element of 3 bytes runs past the end of its data"


# ---------------------------------------------------------------------------- round trips (hypothesis)

# datatype -> (bytes, exponent and mantissa bits, infinity's bits, the NaN that JSON's NaN makes)
NAN_BITS = {
    "FP16": (2, 0x7FFF, 0x7C00, 0x7E00),
    "BF16": (2, 0x7FFF, 0x7F80, 0x7FC0),
    "FP32": (4, 0x7FFFFFFF, 0x7F800000, 0x7FC00000),
    "FP64": (8, 0x7FFFFFFFFFFFFFFF, 0x7FF0 << 48, 0x7FF8 << 48),
}
SIZES = {datatype: np.dtype(NUMPY[datatype]).itemsize for datatype in NUMPY}


def canonical_nans(datatype: str, data: bytes) -> bytes:
    """NaN goes through JSON as the bare NaN: a positive quiet NaN, its payload and sign lost.
    (Found by the bits: numpy warns at casting a signalling NaN, and warnings are errors.)"""
    if datatype not in NAN_BITS:
        return data
    size, magnitude, infinity, nan = NAN_BITS[datatype]
    bits = np.frombuffer(data, f"<u{size}").copy()
    bits[(bits & magnitude) > infinity] = nan
    return bits.tobytes()


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, list[int], Any]:
    """A datatype, a shape, and the tensor's raw bytes (BYTES: a list of UTF-8 items)."""
    datatype = draw(st.sampled_from([*sorted(NUMPY), "BYTES"]))
    shape = draw(st.lists(st.integers(0, 3), max_size=4))
    count = math.prod(shape)
    if datatype == "BYTES":
        return (
            datatype,
            shape,
            [text.encode() for text in draw(st.lists(st.text(max_size=8), min_size=count, max_size=count))],
        )
    data = draw(st.binary(min_size=count * SIZES[datatype], max_size=count * SIZES[datatype]))
    if datatype == "BOOL":
        data = bytes(byte & 1 for byte in data)
    return datatype, shape, canonical_nans(datatype, data)


# Each example takes about a millisecond; the deadline only catches a runaway, with room for a
# loaded 2-core machine (as tests/test_properties_v2.py).
QUICK = settings(
    max_examples=300, deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow], database=None
)


@QUICK
@given(st.lists(tensors(), max_size=4), st.lists(st.booleans(), min_size=4, max_size=4), st.booleans())
def test_outputs_come_back_as_the_same_inputs_bit_for_bit(
    items: list[tuple[str, list[int], Any]], binary: list[bool], nested: bool
) -> None:
    """Random tensors as outputs, encoded as a response (JSON data or binary, per output); the
    response's outputs sent back as a request's inputs (as a client echoing them would: the same
    JSON data, flat or nested, or the same binary bytes) decode to the very same bytes."""
    outputs = [Output(f"t{index}", datatype, shape, data) for index, (datatype, shape, data) in enumerate(items)]
    asked = [RequestedOutput(output.name, binary[index]) for index, output in enumerate(outputs)]
    body, header_length = encode_infer_response("m", "1", "", outputs, RestInferRequest("", [], asked, False))
    header = json.loads(body[:header_length] if header_length else body)
    inputs = []
    for tensor in header["outputs"]:
        if nested and "data" in tensor:
            tensor["data"] = nest(tensor["data"], tensor["shape"])
        inputs.append(tensor)
    request_json = json.dumps({"inputs": inputs}).encode()
    tail = body[header_length:] if header_length else b""
    request_body = request_json + tail
    decoded = decode(request_body, len(request_json) if header_length else None)
    for position, (datatype, shape, data) in enumerate(items):
        value = decoded.args[position]
        if datatype == "BYTES":
            assert value == (data[0] if len(data) == 1 else nest(data, shape))
        else:
            assert value[:3] == ("tensor", np.dtype(NUMPY[datatype]).name, shape)
            assert bytes(decoded.buffers[value[3]]) == data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=12,
)
FIELDS = ["name", "datatype", "shape", "data", "parameters"]


@st.composite
def fuzzed_inputs(draw: st.DrawFn) -> dict[str, Any]:
    """An input near a valid one: data or a binary size, then any field replaced by any JSON."""
    datatypes = st.sampled_from([*SUPPORTED, "UINT16"])
    tensor = {"name": "x", "datatype": draw(datatypes), "shape": draw(st.lists(st.integers(-1, 3), max_size=3))}
    if draw(st.booleans()):
        tensor["data"] = draw(st.lists(json_values, max_size=6))
    else:
        tensor["parameters"] = {"binary_data_size": draw(st.integers(-1, 8))}
    tensor.update(draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=2)))
    return tensor


@QUICK
@given(
    st.lists(fuzzed_inputs(), max_size=3),
    st.dictionaries(st.sampled_from(["id", "parameters", "outputs", "model_name"]), json_values, max_size=3),
    st.binary(max_size=16),
    st.booleans(),
)
def test_any_json_is_parsed_or_refused_with_invalid_argument(
    inputs: list[dict[str, Any]], top: dict[str, Any], tail: bytes, with_header: bool
) -> None:
    """Random JSON where each field goes (and binary bytes after it): a request, or InvalidArgument."""
    request_json = json.dumps({"inputs": inputs, **top}).encode()
    try:
        request = parse_infer_request(request_json + tail, len(request_json) if with_header else None, LIMITS)
        decode_tensors(request.inputs, (), LIMITS)
    except InvalidArgument:
        return


# ---------------------------------------------------------------------------- tritonclient.http


def tritonclient_http(module: str) -> ModuleType:
    """One of tritonclient.http's own modules (_infer_input, _utils, ...), loaded from its file:
    the package's __init__ imports its HTTP client (gevent, monkey-patching), which these unit
    tests need not load: the modules that build request bodies and read responses need only
    numpy, rapidjson and tritonclient.utils. Private names: no stub in sys.modules."""
    path = Path(tritonclient.__file__).parent / "http" / f"{module}.py"
    spec = importlib.util.spec_from_file_location(f"_tritonclient_http_{module}", path)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


InferInput = tritonclient_http("_infer_input").InferInput
InferRequestedOutput = tritonclient_http("_requested_output").InferRequestedOutput
InferResult = tritonclient_http("_infer_result").InferResult
_get_inference_request = tritonclient_http("_utils")._get_inference_request


def triton_arrays() -> dict[str, np.ndarray]:
    arrays = {datatype: np.array(VALUES[datatype], NUMPY[datatype]).reshape(2, 2) for datatype in VALUES}
    arrays["BF16"] = np.array(VALUES["BF16"], np.float32).astype(ml_dtypes.bfloat16).reshape(2, 2)  # as torch
    arrays["BYTES"] = np.array([b"h\xc3\xa9", b"", b"abc", b"\xe2\x98\x83"], dtype=np.object_).reshape(2, 2)
    return arrays


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_requests_parse(binary: bool) -> None:
    arrays = triton_arrays()
    inputs = []
    for datatype, array in arrays.items():
        tensor = InferInput(f"in_{datatype}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary or datatype == "BF16")  # BF16: binary only
        inputs.append(tensor)
    outputs = [InferRequestedOutput("y", binary_data=binary), InferRequestedOutput("z", binary_data=not binary)]
    body, json_size = _get_inference_request(
        inputs=inputs,
        request_id="req-1",
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=None,
    )
    assert json_size is not None  # BF16 makes every request binary
    request = parse_infer_request(body, json_size, LIMITS)
    assert request.id == "req-1" and not request.binary_output
    assert request.outputs == [RequestedOutput("y", binary), RequestedOutput("z", not binary)]
    decoded = decode_tensors(request.inputs, (), LIMITS)
    for position, (datatype, array) in enumerate(arrays.items()):
        if datatype == "BYTES":
            assert decoded.args[position] == array.tolist()
        else:
            assert raw_of(decoded, position) == array.tobytes()


def test_tritonclient_request_without_outputs_asks_binary() -> None:
    tensor = InferInput("x", [3], "FP32")
    tensor.set_data_from_numpy(np.array([1, 2, 3], np.float32), binary_data=False)
    body, json_size = _get_inference_request([tensor], "", None, 0, False, False, 0, None, None)
    assert json_size is None
    request = parse_infer_request(body, json_size, LIMITS)
    assert request.binary_output and request.outputs == [] and request.id == ""
    assert raw_of(decode_tensors(request.inputs, (), LIMITS)) == np.array([1, 2, 3], np.float32).tobytes()


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_reads_our_responses(binary: bool) -> None:
    arrays = triton_arrays()
    outputs = [
        Output(
            f"out_{datatype}",
            datatype,
            list(array.shape),
            array.tobytes() if datatype != "BYTES" else array.flatten().tolist(),
        )
        for datatype, array in arrays.items()
    ]
    request = RestInferRequest("", [], [], binary)
    body, header_length = encode_infer_response("m", "2", "req-9", outputs, request)
    assert (header_length is not None) == binary
    result = InferResult.from_response_body(body, header_length=header_length)
    assert result.get_response()["model_version"] == "2" and result.get_response()["id"] == "req-9"
    for datatype, array in arrays.items():
        got = result.as_numpy(f"out_{datatype}")
        assert got.shape == array.shape
        if datatype == "BYTES":
            items = [item if type(item) is bytes else item.encode() for item in got.flatten().tolist()]
            assert items == array.flatten().tolist()
        else:
            assert got.dtype == array.dtype and got.tobytes() == array.tobytes()
