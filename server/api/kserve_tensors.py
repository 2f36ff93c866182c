"""KServe v2 tensors <-> packed values (server.ipc.protocol), in the daemon.

A v2 input becomes the same packed tensor a deployd.v1 tensor does: its bytes, checked
against datatype and shape, handed on as a buffer (to shared memory above the threshold),
never built into a tensor here. Raw contents are taken as they come (one copy, when
protobuf hands the field over; none for a view into a REST body); typed contents
(`fp32_contents`, ...) are packed into little-endian bytes first.

One codec behind both protocols: each turns its request into InputTensors (gRPC:
decode_inputs here; REST: server.api.kserve_rest), and decode_tensors makes the call's
arguments from them, with the same checks and messages whichever protocol carried them.

Inputs: positional arguments in request order, or keyword arguments matched by name when
the model's repository entry declares its inputs. BYTES: one element is a Python bytes,
more are a list of them (nested lists for more than one dimension).

Outputs: a tensor (or a scalar, or bytes/str) is `output0`; a tuple or list of them is
`output0..N` (a list of bytes/str is one BYTES output); a dict keeps its keys as names.
Declared output names replace the positional ones. Anything else has no tensor form.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from deployd_wire.dtypes import BY_KSERVE, BY_NAME
from server.api.values import ShapeWording, ValueLimits, check_shape
from server.errors import InvalidArgument
from server.models.entry import TensorSpec

if TYPE_CHECKING:  # only for the annotations: any stubs of the v2 messages will do
    from deployd_wire.proto import grpc_predict_v2_pb2 as v2

BYTES = "BYTES"
SUPPORTED = (*BY_KSERVE, BYTES)
# datatype -> (typed contents field, array typecode packing it); FP16 and BF16 have no typed field.
_TYPED: dict[str, tuple[str, str]] = {
    "BOOL": ("bool_contents", "B"),
    "UINT8": ("uint_contents", "B"),
    "INT8": ("int_contents", "b"),
    "INT16": ("int_contents", "h"),
    "INT32": ("int_contents", "i"),
    "INT64": ("int64_contents", "q"),
    "FP32": ("fp32_contents", "f"),
    "FP64": ("fp64_contents", "d"),
    BYTES: ("bytes_contents", ""),
}
_LENGTH = struct.Struct("<I")  # the length before each element of a raw BYTES tensor


class Signature(NamedTuple):
    """What a call's tensors looked like, for ModelMetadata when nothing is declared."""

    name: str
    datatype: str
    rank: int


class DecodedInputs(NamedTuple):
    args: list[Any]
    kwargs: dict[str, Any]
    buffers: list[Any]
    raw: bool  # the request sent raw contents: answer with raw contents too
    seen: list[Signature]


class InputTensor(NamedTuple):
    """One input as either protocol carries it (gRPC: decode_inputs; REST: server.api.kserve_rest)."""

    name: str  # "" -> f"input{position}"
    datatype: str
    shape: list[int]
    raw: Any  # bytes-like raw little-endian contents (BYTES: each element a 4-byte LE length, then
    #           its bytes), or None; a memoryview slice of a larger body is taken without a copy
    contents: Any  # gRPC InferTensorContents (typed fields), or None


def decode_inputs(request: v2.ModelInferRequest, declared: Sequence[TensorSpec], limits: ValueLimits) -> DecodedInputs:
    """ModelInfer's inputs: every one in raw_input_contents, or every one in typed contents."""
    return decode_tensors(input_tensors(request), declared, limits)


def input_tensors(request: v2.ModelInferRequest) -> list[InputTensor]:
    """ModelInfer's inputs as either protocol carries them."""
    raw_contents = request.raw_input_contents
    raw = len(raw_contents) > 0
    if raw and len(raw_contents) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents has {len(raw_contents)} entries for {len(request.inputs)} inputs")
    inputs = [
        InputTensor(
            tensor.name,
            tensor.datatype,
            list(tensor.shape),
            raw_contents[position] if raw else None,
            # Typed contents when raw is not used, set or not (unset: no values, a clear count error).
            tensor.contents if not raw or tensor.HasField("contents") else None,
        )
        for position, tensor in enumerate(request.inputs)
    ]
    return inputs


def decode_tensors(inputs: Sequence[InputTensor], declared: Sequence[TensorSpec], limits: ValueLimits) -> DecodedInputs:
    """Protocol-neutral inputs as the packed arguments of a call. DecodedInputs.raw: some input
    came as raw contents (gRPC answers with raw contents then)."""
    by_name = {spec.name: spec for spec in declared}
    buffers: list[Any] = []
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    seen: list[Signature] = []
    for position, tensor in enumerate(inputs):
        name = tensor.name or f"input{position}"
        spec = by_name.get(name)
        if declared:
            if spec is None:
                raise InvalidArgument(f"{_input(name)}: the model has no such input (inputs: {', '.join(by_name)})")
            if name in kwargs:
                raise InvalidArgument(f"{_input(name)} is given twice")
        shape = _checked_shape(name, tensor.datatype, tensor.shape, spec, limits)
        if tensor.raw is not None:
            if tensor.contents is not None:
                raise InvalidArgument(f"{_input(name)}: contents and raw_input_contents cannot both be used")
            value = _from_raw(name, tensor.datatype, shape, tensor.raw, buffers)
        elif tensor.contents is not None:
            value = _from_typed(name, tensor.datatype, shape, tensor.contents, buffers)
        else:
            raise InvalidArgument(f"{_input(name)} has no data")
        if declared:
            kwargs[name] = value
        else:
            args.append(value)
        seen.append(Signature(name, tensor.datatype, len(shape)))
    missing = [spec.name for spec in declared if spec.name not in kwargs]
    if missing:
        raise InvalidArgument(f"missing input{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    raw = any(tensor.raw is not None for tensor in inputs)
    return DecodedInputs(args, kwargs, buffers, raw, seen)


def check_tensor(name: str, datatype: str, shape: list[int], limits: ValueLimits) -> None:
    """The checks decode_tensors makes of a tensor's datatype and shape before it looks at any
    data (its declared form aside), for a codec that must check before it builds the data."""
    _checked_shape(name, datatype, shape, None, limits)


# KServe v2 inputs: {name} is "input 'x'".
_SHAPE_WORDING = ShapeWording(
    InvalidArgument,
    rank="{name} has {rank} dimensions, over the limit of {limit} (limits.max_tensor_rank)",
    negative="{name}: shape {shape} has a negative size",
    overflow="{name}: shape {shape} is too large: its sizes overflow int64",
    elements="{name}: shape {shape} has {elements} elements, over the limit of {limit} (limits.{key})",
)


def _input(name: str) -> str:
    return f"input {name!r}"


def _checked_shape(
    name: str, datatype: str, shape: list[int], spec: TensorSpec | None, limits: ValueLimits
) -> list[int]:
    if datatype not in SUPPORTED:
        raise InvalidArgument(
            f"{_input(name)}: datatype {datatype!r} is not supported (one of: {', '.join(SUPPORTED)})"
        )
    if spec is not None:
        if datatype != spec.datatype:
            raise InvalidArgument(f"{_input(name)}: datatype {datatype}, but the model declares {spec.datatype}")
        if len(shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
        ):
            raise InvalidArgument(f"{_input(name)}: shape {shape}, but the model declares {list(spec.shape)}")
    itemsize = BY_KSERVE[datatype].itemsize if datatype != BYTES else 1
    if datatype == BYTES:
        check_shape(
            shape,
            itemsize,
            limits,
            _SHAPE_WORDING,
            _input(name),
            max_elements=limits.max_container_items,
            limit_key="max_container_items",
            before_elements=lambda shape: _check_bytes_lists(name, shape, limits),
        )
    else:
        check_shape(shape, itemsize, limits, _SHAPE_WORDING, _input(name))
    return shape


def _check_bytes_lists(name: str, shape: list[int], limits: ValueLimits) -> None:
    if math.prod(shape[:-1]) > limits.max_container_items:
        # Nested lists, one per row of every dimension but the last: bounded like their elements.
        raise InvalidArgument(
            f"{_input(name)}: BYTES of shape {shape} makes {math.prod(shape[:-1])} lists, over the limit of"
            f" {limits.max_container_items} (limits.max_container_items)"
        )


def _from_raw(name: str, datatype: str, shape: list[int], data: Any, buffers: list[Any]) -> Any:
    if type(data) is not bytes:
        data = memoryview(data).cast("B")  # lengths in bytes, whatever the view's format
    elements = math.prod(shape)
    if datatype == BYTES:
        items: list[bytes] = []
        offset = 0
        while offset < len(data) and len(items) < elements:
            if offset + 4 > len(data):
                break
            (length,) = _LENGTH.unpack_from(data, offset)
            offset += 4
            if offset + length > len(data):
                raise InvalidArgument(
                    f"{_input(name)}: a BYTES element of {length} bytes runs past the end of its data"
                )
            items.append(bytes(data[offset : offset + length]))  # a view's slice is a view: bytes
            offset += length
        if len(items) != elements or offset != len(data):
            raise InvalidArgument(
                f"{_input(name)}: BYTES of shape {shape} needs {elements} length-prefixed elements,"
                f" the data does not hold exactly that"
            )
        return _bytes_value(items, shape)
    dtype = BY_KSERVE[datatype]
    expected = elements * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{_input(name)}: {datatype} of shape {shape} needs {expected} bytes of raw contents, got {len(data)}"
        )
    buffers.append(data)
    return ("tensor", dtype.name, shape, len(buffers) - 1)


def _from_typed(
    name: str,
    datatype: str,
    shape: list[int],
    contents: v2.InferTensorContents,
    buffers: list[Any],
) -> Any:
    typed = _TYPED.get(datatype)
    if typed is None:
        raise InvalidArgument(f"{_input(name)}: {datatype} has no typed contents field: send it in raw_input_contents")
    field, typecode = typed
    values = getattr(contents, field)
    elements = math.prod(shape)
    if len(values) != elements:
        raise InvalidArgument(
            f"{_input(name)}: {datatype} of shape {shape} needs {elements} values"
            f" in contents.{field}, got {len(values)}"
        )
    if datatype == BYTES:
        return _bytes_value(list(values), shape)
    try:
        data = array(typecode, values).tobytes()
    except OverflowError:
        raise InvalidArgument(f"{_input(name)}: a value in contents.{field} does not fit in {datatype}") from None
    buffers.append(data)
    return ("tensor", BY_KSERVE[datatype].name, shape, len(buffers) - 1)


def _bytes_value(items: list[bytes], shape: list[int]) -> Any:
    if len(items) == 1:
        return items[0]
    return _nested(items, shape)


def _nested(items: list[Any], shape: list[int]) -> list[Any]:
    """Flat items as nested lists of the given shape (a size 0 makes empty lists)."""
    if len(shape) <= 1:
        return items
    size = math.prod(shape[1:])
    return [_nested(items[row * size : (row + 1) * size], shape[1:]) for row in range(shape[0])]


# ---------------------------------------------------------------------------- outputs


class Output(NamedTuple):
    name: str
    datatype: str
    shape: list[int]
    data: Any  # bytes-like (a tensor's), or a list of bytes (BYTES)


def result_outputs(packed: Any, buffers: list[Any], declared: Sequence[TensorSpec]) -> list[Output]:
    """The outputs a packed result makes, named; InvalidArgument for what has no tensor form."""
    names = [spec.name for spec in declared]
    if type(packed) is dict:
        return [_output(str(key), item, buffers) for key, item in packed.items()]
    items: list[Any] | None = None
    if type(packed) is list and not _all_text(packed):
        items = packed
    elif type(packed) is tuple and packed[0] == "tuple":
        items = packed[1]
    if items is None:
        return [_output(names[0] if names else "output0", packed, buffers)]
    return [
        _output(names[index] if index < len(names) else f"output{index}", item, buffers)
        for index, item in enumerate(items)
    ]


def _all_text(items: list[Any]) -> bool:
    return bool(items) and all(type(item) in (bytes, str) for item in items)


def _output(name: str, packed: Any, buffers: list[Any]) -> Output:
    kind = type(packed)
    if kind is tuple and packed[0] == "tensor":
        _, dtype_name, shape, index = packed
        datatype = BY_NAME[dtype_name].kserve
        if not datatype:
            raise InvalidArgument(f"output {name!r} is a {dtype_name} tensor, which KServe v2 has no datatype for")
        return Output(name, datatype, list(shape), buffers[index])
    if kind is bool:
        return Output(name, "BOOL", [], bytes([packed]))
    if kind is int:
        return Output(name, "INT64", [], struct.pack("<q", packed))
    if kind is float:
        return Output(name, "FP64", [], struct.pack("<d", packed))
    if kind in (bytes, str):
        return Output(name, BYTES, [1], [_as_bytes(packed)])
    if kind is list and _all_text(packed):
        return Output(name, BYTES, [len(packed)], [_as_bytes(item) for item in packed])
    raise InvalidArgument(f"output {name!r} is {_describe(packed)}, which has no tensor form")


def _as_bytes(item: bytes | str) -> bytes:
    return item.encode() if type(item) is str else item  # type: ignore[return-value]


def _describe(packed: Any) -> str:
    if packed is None:
        return "None"
    if type(packed) is dict:
        return "a dict"
    if type(packed) is list:
        return "a list" if packed else "an empty list"
    if type(packed) is tuple and packed[0] == "tuple":
        return "a tuple"
    return f"a {type(packed).__name__}"


def select_outputs(outputs: list[Output], requested: Sequence[str]) -> list[Output]:
    if not requested:
        return outputs
    by_name = {output.name: output for output in outputs}
    unknown = [name for name in requested if name not in by_name]
    if unknown:
        raise InvalidArgument(
            f"the model has no output {', '.join(map(repr, unknown))} (outputs: {', '.join(by_name) or 'none'})"
        )
    return [by_name[name] for name in requested]


def fill_response(outputs: list[Output], raw: bool, response: v2.ModelInferResponse) -> list[Signature]:
    """Put outputs into response: raw contents when the request used them (or an output has no
    typed field: FP16, BF16), else typed contents."""
    raw = raw or any(_TYPED.get(output.datatype) is None for output in outputs)
    seen = []
    for output in outputs:
        tensor = response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        if output.datatype == BYTES:
            if raw:
                response.raw_output_contents.append(b"".join(_LENGTH.pack(len(item)) + item for item in output.data))
            else:
                tensor.contents.bytes_contents.extend(output.data)
        elif raw:
            response.raw_output_contents.append(bytes(output.data))
        else:
            field, typecode = _TYPED[output.datatype]
            values = array(typecode)
            values.frombytes(output.data)
            getattr(tensor.contents, field).extend(values if output.datatype != "BOOL" else map(bool, values))
        seen.append(Signature(output.name, output.datatype, len(output.shape)))
    return seen
