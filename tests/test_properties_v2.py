"""Properties of the KServe v2 tensor codec (server.api.kserve_tensors) on generated input
(hypothesis), in-process, without a daemon.

A request's tensor becomes a packed tensor whose buffer is exactly the bytes sent; that packed
value as a result becomes an output of the same datatype, shape and bytes, raw or typed as the
request was. BYTES elements come back as sent: one element is bytes, more a list nested by
shape. Any request meets a bad shape, datatype or byte count with InvalidArgument, nothing else.

The messages are tritonclient's (`tritonclient.grpc.service_pb2`): the codec only reads and
sets their fields, and deployd_wire/proto's v2 stubs may not be imported beside them (both register
the protobuf package `inference`).
"""

from __future__ import annotations

import math
import struct
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as v2

from server.api.kserve_tensors import BYTES, decode_inputs, fill_response, result_outputs, select_outputs
from server.api.values import ValueLimits
from server.errors import InvalidArgument
from server.models.entry import TensorSpec

# Each example takes well under a millisecond; the deadline only catches a runaway (a loop over
# a huge shape), with room for a loaded 2-core machine.
QUICK = settings(
    max_examples=150,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
LIMITS = ValueLimits()

SIZES = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
}
TORCH_NAMES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "BF16": "bfloat16",
    "FP32": "float32",
    "FP64": "float64",
}
# datatype -> typed contents field, struct format, and the values it may hold
TYPED: dict[str, tuple[str, str, st.SearchStrategy[Any]]] = {
    "BOOL": ("bool_contents", "?", st.booleans()),
    "UINT8": ("uint_contents", "B", st.integers(0, 255)),
    "INT8": ("int_contents", "b", st.integers(-128, 127)),
    "INT16": ("int_contents", "h", st.integers(-(2**15), 2**15 - 1)),
    "INT32": ("int_contents", "i", st.integers(-(2**31), 2**31 - 1)),
    "INT64": ("int64_contents", "q", st.integers(-(2**63), 2**63 - 1)),
    "FP32": ("fp32_contents", "f", st.floats(width=32)),
    "FP64": ("fp64_contents", "d", st.floats()),
}

shapes = st.lists(st.integers(0, 6), max_size=4)  # up to 1296 elements
positive_shapes = st.lists(st.integers(1, 4), max_size=4)


@st.composite
def raw_tensors(draw: st.DrawFn) -> tuple[str, list[int], bytes]:
    """A numeric datatype, a shape, and raw bytes of exactly the right size."""
    datatype = draw(st.sampled_from(sorted(SIZES)))
    shape = draw(shapes)
    size = math.prod(shape) * SIZES[datatype]
    return datatype, shape, draw(st.binary(min_size=size, max_size=size))


def raw_request(tensors: list[tuple[str, list[int], bytes]], names: list[str] | None = None) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="m")
    for index, (datatype, shape, data) in enumerate(tensors):
        request.inputs.add(name=names[index] if names else f"in{index}", datatype=datatype, shape=shape)
        request.raw_input_contents.append(data)
    return request


def length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def parse_length_prefixed(data: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        items.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    assert offset == len(data)
    return items


def nested(items: list[bytes], shape: list[int]) -> Any:
    """What BYTES of a shape is to the model: one element bytes, more a list nested by shape."""
    if len(items) == 1:
        return items[0]

    def build(flat: list[bytes], dims: list[int]) -> list[Any]:
        if len(dims) <= 1:
            return flat
        size = math.prod(dims[1:])
        return [build(flat[i * size : (i + 1) * size], dims[1:]) for i in range(dims[0])]

    return build(items, shape)


# ---------------------------------------------------------------------------- numeric tensors


@QUICK
@given(st.lists(raw_tensors(), min_size=1, max_size=4))
def test_raw_tensors_round_trip_bit_for_bit(tensors: list[tuple[str, list[int], bytes]]) -> None:
    """Raw in: each input a packed tensor of exactly the bytes sent; as a result (one tensor, or a
    tuple of them) raw out, with the same datatype, shape and bytes."""
    decoded = decode_inputs(raw_request(tensors), (), LIMITS)
    assert decoded.raw and not decoded.kwargs
    assert len(decoded.args) == len(tensors)
    for packed, (datatype, shape, data) in zip(decoded.args, tensors, strict=True):
        kind, dtype_name, packed_shape, index = packed
        assert (kind, dtype_name, list(packed_shape)) == ("tensor", TORCH_NAMES[datatype], shape)
        assert bytes(decoded.buffers[index]) == data
    result = decoded.args[0] if len(tensors) == 1 else ("tuple", decoded.args)
    outputs = result_outputs(result, decoded.buffers, ())
    response = v2.ModelInferResponse()
    seen = fill_response(outputs, raw=True, response=response)
    assert [output.name for output in response.outputs] == [f"output{i}" for i in range(len(tensors))]
    assert [(signature.datatype, signature.rank) for signature in seen] == [(d, len(s)) for d, s, _ in tensors]
    assert not any(output.HasField("contents") for output in response.outputs)
    for output, raw, (datatype, shape, data) in zip(
        response.outputs, response.raw_output_contents, tensors, strict=True
    ):
        assert (output.datatype, list(output.shape), raw) == (datatype, shape, data)


@st.composite
def typed_tensors(draw: st.DrawFn) -> tuple[str, list[int], list[Any]]:
    datatype = draw(st.sampled_from(sorted(TYPED)))
    shape = draw(shapes.filter(lambda shape: math.prod(shape) <= 64))
    values = draw(st.lists(TYPED[datatype][2], min_size=math.prod(shape), max_size=math.prod(shape)))
    return datatype, shape, values


def packed_bytes(datatype: str, values: list[Any]) -> bytes:
    return struct.pack(f"<{len(values)}{TYPED[datatype][1]}", *values)


@QUICK
@given(st.lists(typed_tensors(), min_size=1, max_size=3))
def test_typed_tensors_round_trip(tensors: list[tuple[str, list[int], list[Any]]]) -> None:
    """Typed in (`*_contents`): packed little-endian into the buffer; typed out, the same values."""
    request = v2.ModelInferRequest(model_name="m")
    for index, (datatype, shape, values) in enumerate(tensors):
        tensor = request.inputs.add(name=f"in{index}", datatype=datatype, shape=shape)
        getattr(tensor.contents, TYPED[datatype][0]).extend(values)
    decoded = decode_inputs(request, (), LIMITS)
    assert not decoded.raw
    for packed, (datatype, _, values) in zip(decoded.args, tensors, strict=True):
        assert bytes(decoded.buffers[packed[3]]) == packed_bytes(datatype, values)
    outputs = result_outputs(("tuple", decoded.args), decoded.buffers, ())
    response = v2.ModelInferResponse()
    fill_response(outputs, raw=False, response=response)
    assert not response.raw_output_contents
    for output, (datatype, shape, values) in zip(response.outputs, tensors, strict=True):
        assert (output.datatype, list(output.shape)) == (datatype, shape)
        got = list(getattr(output.contents, TYPED[datatype][0]))
        assert packed_bytes(datatype, got) == packed_bytes(datatype, values)  # NaN bits too


@QUICK
@given(raw_tensors(), st.data())
def test_declared_inputs_are_keyword_arguments(tensor: tuple[str, list[int], bytes], data: st.DataObject) -> None:
    """Declared inputs are matched by name, whatever their order; -1 takes any size; a declared
    output name names the result."""
    datatype, shape, raw = tensor
    declared_shape = tuple(data.draw(st.sampled_from([size, -1])) for size in shape)
    declared = (TensorSpec("other", "INT64", (-1,)), TensorSpec("x", datatype, declared_shape))
    other = struct.pack("<q", data.draw(st.integers(-(2**63), 2**63 - 1)))
    decoded = decode_inputs(raw_request([("INT64", [1], other), tensor], ["other", "x"]), declared, LIMITS)
    assert not decoded.args and list(decoded.kwargs) == ["other", "x"]
    assert bytes(decoded.buffers[decoded.kwargs["x"][3]]) == raw
    assert bytes(decoded.buffers[decoded.kwargs["other"][3]]) == other
    outputs = result_outputs(decoded.kwargs["x"], decoded.buffers, (TensorSpec("y", datatype, declared_shape),))
    assert [(output.name, output.datatype, output.shape, bytes(output.data)) for output in outputs] == [
        ("y", datatype, shape, raw)
    ]
    dict_outputs = select_outputs(result_outputs(decoded.kwargs, decoded.buffers, ()), ["x"])
    assert [(output.name, bytes(output.data)) for output in dict_outputs] == [("x", raw)]


# ---------------------------------------------------------------------------- BYTES

byte_strings = st.binary(max_size=24)


@QUICK
@given(positive_shapes.filter(lambda shape: math.prod(shape) <= 64), st.data(), st.booleans())
def test_bytes_inputs_nest_by_shape(shape: list[int], data: st.DataObject, raw: bool) -> None:
    """BYTES elements, raw (length-prefixed) or typed: one element is bytes, more a list nested by shape."""
    items = data.draw(st.lists(byte_strings, min_size=math.prod(shape), max_size=math.prod(shape)))
    request = v2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=BYTES, shape=shape)
    if raw:
        request.raw_input_contents.append(length_prefixed(items))
    else:
        tensor.contents.bytes_contents.extend(items)
    decoded = decode_inputs(request, (), LIMITS)
    assert decoded.args == [nested(items, shape)] and not decoded.buffers
    assert decoded.seen[0].datatype == BYTES and decoded.seen[0].rank == len(shape)


@QUICK
@given(st.lists(byte_strings, min_size=1, max_size=40), st.booleans())
def test_bytes_round_trip(items: list[bytes], raw: bool) -> None:
    """A list of byte strings in, the same list out: raw (length-prefixed) or typed as it came."""
    request = v2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=BYTES, shape=[len(items)])
    if raw:
        request.raw_input_contents.append(length_prefixed(items))
    else:
        tensor.contents.bytes_contents.extend(items)
    decoded = decode_inputs(request, (), LIMITS)
    (value,) = decoded.args
    assert value == (items[0] if len(items) == 1 else items)
    outputs = result_outputs(value, decoded.buffers, ())
    response = v2.ModelInferResponse()
    fill_response(outputs, raw=decoded.raw, response=response)
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("output0", BYTES, [len(items)])
    if raw:
        assert parse_length_prefixed(response.raw_output_contents[0]) == items
    else:
        assert list(output.contents.bytes_contents) == items and not response.raw_output_contents


# ---------------------------------------------------------------------------- anything else

DATATYPES = [*SIZES, BYTES, "UINT16", "UINT64", "STRING", "", "fp32", "\u2603"]
any_shape = st.lists(
    st.one_of(st.integers(-3, 6), st.sampled_from([0, -(2**63), 2**31, 2**40, 2**62, 2**63 - 1])),
    max_size=6,
) | st.lists(st.integers(0, 2), min_size=30, max_size=40)


def bytes_with_an_empty_inner_dimension(datatype: str, shape: list[int]) -> bool:
    """The bug tests/test_fuzz_v2.py keeps as a strict xfail: BYTES of shape [..., 0, ...] after
    the first dimension fails with ValueError instead of an answer."""
    return datatype == BYTES and 0 in shape[1:] and all(size >= 0 for size in shape)


@QUICK
@given(
    st.lists(
        st.tuples(st.sampled_from(DATATYPES), any_shape, st.one_of(st.none(), st.binary(max_size=64))),
        max_size=3,
    ),
    st.integers(-1, 1),
)
def test_any_request_is_decoded_or_refused_with_invalid_argument(
    tensors: list[tuple[str, list[int], bytes | None]], extra_raw: int
) -> None:
    """Random datatypes, shapes (negative, huge, high rank) and contents: decode_inputs returns,
    or raises InvalidArgument; nothing else, and never a loop over a huge shape (the deadline)."""
    assume(not any(bytes_with_an_empty_inner_dimension(datatype, shape) for datatype, shape, _ in tensors))
    request = v2.ModelInferRequest(model_name="m")
    raws = []
    for datatype, shape, data in tensors:
        tensor = request.inputs.add(name="x", datatype=datatype, shape=shape)
        if data is None:
            tensor.contents.int_contents.extend([1, 2])
        raws.append(data or b"")
    if any(data is not None for _, _, data in tensors):
        raws = raws[: len(raws) + extra_raw] if extra_raw < 0 else raws + [b""] * extra_raw
        request.raw_input_contents.extend(raws)
    try:
        decoded = decode_inputs(request, (), LIMITS)
    except InvalidArgument:
        return
    by_torch_name = {name: datatype for datatype, name in TORCH_NAMES.items()}
    for packed in decoded.args:
        if type(packed) is tuple and packed[0] == "tensor":
            _, dtype_name, shape, index = packed
            assert len(decoded.buffers[index]) == math.prod(shape) * SIZES[by_torch_name[dtype_name]]
