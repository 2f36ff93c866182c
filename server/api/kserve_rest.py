"""KServe v2 / Open Inference Protocol infer bodies over HTTP/REST, with Triton's binary tensor
data extension, as tritonclient.http and KServe's InferenceRESTClient send and read them.

Pure functions over bytes: no HTTP library, no torch. The HTTP server reads the body and the
`Inference-Header-Content-Length` header, and the tensors take the same road as gRPC
ModelInfer's (server.api.kserve_tensors), so names, versions, declared inputs and outputs,
limits and errors are the same whichever protocol carried the call:

    body, header length ──parse_infer_request──> RestInferRequest(id, inputs, outputs, binary_output)
      JSON "data" (flat or nested)       -> raw little-endian bytes (BYTES: length-prefixed), checked
                                            against shape and limits before any is built
      "parameters.binary_data_size": N   -> the next N bytes after the JSON header, a memoryview of
                                            the body (no copy)
    inputs ──kserve_tensors.decode_tensors──> the call's packed arguments (as gRPC's)
    [Output] ──encode_infer_response──> body, header length (None: the body is plain JSON)
      an output asked for as binary      -> its bytes after the JSON, "parameters.binary_data_size"
      any other                          -> JSON "data", a flat list in row-major order

A body with binary data: the first `Inference-Header-Content-Length` bytes are the JSON, then
each binary tensor's bytes end to end, in the order of the tensors in the JSON. Errors are
InvalidArgument (HTTP 400), with a message naming the field.

Non-finite floats (NaN, Infinity, -Infinity) are written as those bare tokens, as Python's json
and Triton itself (rapidjson with kWriteNanAndInfFlag) write them, and read the same way:
tritonclient.http's parser (python-rapidjson) takes them. Strict JSON parsers do not (KServe's
InferenceRESTClient reads with orjson, which refuses them): such a caller asks for the output
as binary data. Writing null instead would turn inf into NaN and lose the sign.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import sys
from array import array
from collections.abc import Callable
from typing import Any, NamedTuple

from server.api.kserve_tensors import BYTES, SUPPORTED, InputTensor, Output, check_tensor
from server.api.values import ValueLimits
from server.errors import InvalidArgument

HEADER_LENGTH = "Inference-Header-Content-Length"  # the request's and the response's header
_LENGTH = struct.Struct("<I")  # before each element of a binary BYTES tensor
_BIG_ENDIAN = sys.byteorder == "big"


class RequestedOutput(NamedTuple):
    name: str
    binary: bool | None  # parameters.binary_data; None: the request's binary_output


class RestInferRequest(NamedTuple):
    id: str
    inputs: list[InputTensor]
    outputs: list[RequestedOutput]  # empty: every output the model gives
    binary_output: bool  # parameters.binary_data_output (default False)


# ---------------------------------------------------------------------------- requests


def parse_header_length(text: str | None) -> int | None:
    """The value of the Inference-Header-Content-Length header (None: no header)."""
    if text is None:
        return None
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise InvalidArgument(f"{HEADER_LENGTH} {text[:32]!r} is not a number of bytes")
    return int(text)


def parse_infer_request(body: bytes, header_length: int | None, limits: ValueLimits) -> RestInferRequest:
    """An infer request's body as protocol-neutral inputs. header_length: the value of the
    Inference-Header-Content-Length header (None: the whole body is JSON)."""
    view = memoryview(body).cast("B")
    if header_length is None:
        header_length = len(view)
        binary = False
    elif not 0 <= header_length <= len(view):
        raise InvalidArgument(f"{HEADER_LENGTH} is {header_length}, but the body has {len(view)} bytes")
    else:
        binary = True
    request = _object(_loads(view[:header_length]), "the request body")
    request_id = request.get("id", "")
    if type(request_id) is not str:
        raise InvalidArgument(f'"id" must be a string, not {_kind(request_id)}')
    parameters = _parameters(request, "the request")
    binary_output = parameters.get("binary_data_output", False)
    if type(binary_output) is not bool:
        raise InvalidArgument(f"parameters.binary_data_output must be true or false, not {_kind(binary_output)}")
    if "inputs" not in request:
        raise InvalidArgument('the request has no "inputs"')
    inputs_json = _list(request["inputs"], '"inputs"')
    outputs_json = _list(request.get("outputs", []), '"outputs"')
    outputs = [_requested_output(position, item) for position, item in enumerate(outputs_json)]

    inputs: list[InputTensor] = []
    sizes: list[tuple[int, int]] = []  # (index in inputs, binary_data_size)
    for position, item in enumerate(inputs_json):
        tensor, size = _input(position, item, limits)
        if size is not None:
            sizes.append((position, size))
        inputs.append(tensor)
    if sizes and not binary:
        name = inputs[sizes[0][0]].name
        raise InvalidArgument(
            f"input {name!r} has parameters.binary_data_size, but the request has no {HEADER_LENGTH} header"
            " to say where the JSON ends"
        )
    rest = len(view) - header_length
    total = sum(size for _, size in sizes)
    if total != rest:
        raise InvalidArgument(
            f"the body has {rest} bytes after its {header_length} bytes of JSON, but the inputs'"
            f" parameters.binary_data_size add up to {total}"
        )
    offset = header_length
    for index, size in sizes:
        inputs[index] = inputs[index]._replace(raw=view[offset : offset + size])
        offset += size
    return RestInferRequest(request_id, inputs, outputs, binary_output)


def _loads(data: memoryview) -> Any:
    try:
        text = str(data, "utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"the request's JSON is not UTF-8 (byte {error.start}: {error.reason})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidArgument("the request's JSON is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError; also an integer of over 4300 digits
        raise InvalidArgument(f"the request's JSON is not valid: {error}") from None


def _input(position: int, item: Any, limits: ValueLimits) -> tuple[InputTensor, int | None]:
    """An input of the JSON, its data (if in the JSON) built into raw bytes; with its
    binary_data_size (None: its data is in the JSON)."""
    where = f"inputs[{position}]"
    tensor = _object(item, where)
    for key in ("name", "datatype", "shape"):
        if key not in tensor:
            raise InvalidArgument(f'{where} has no "{key}"')
    name = tensor["name"]
    if type(name) is not str:
        raise InvalidArgument(f"{where}.name must be a string, not {_kind(name)}")
    name = name or f"input{position}"  # as gRPC's decode_inputs names it
    datatype = tensor["datatype"]
    if type(datatype) is not str:
        raise InvalidArgument(f"input {name!r}: datatype must be a string, not {_kind(datatype)}")
    shape = tensor["shape"]
    if type(shape) is not list or any(type(size) is not int for size in shape):
        raise InvalidArgument(f"input {name!r}: shape must be a list of integers, not {_describe(shape)}")
    check_tensor(name, datatype, shape, limits)  # before any data is looked at
    parameters = _parameters(tensor, f"input {name!r}")
    _refuse_shared_memory(parameters, f"input {name!r}")
    size = parameters.get("binary_data_size")
    if "data" in tensor:
        if size is not None:
            raise InvalidArgument(f"input {name!r} has both data and parameters.binary_data_size: one or the other")
        raw = _raw_from_json(name, datatype, shape, tensor["data"])
        return InputTensor(name, datatype, shape, raw, None), None
    if size is None:
        raise InvalidArgument(f"input {name!r} has neither data nor parameters.binary_data_size")
    if type(size) is not int or size < 0:
        raise InvalidArgument(
            f"input {name!r}: parameters.binary_data_size must be a number of bytes, not {_found(size)}"
        )
    return InputTensor(name, datatype, shape, b"", None), size  # raw: its slice of the body, later


def _requested_output(position: int, item: Any) -> RequestedOutput:
    where = f"outputs[{position}]"
    output = _object(item, where)
    if "name" not in output:
        raise InvalidArgument(f'{where} has no "name"')
    name = output["name"]
    if type(name) is not str:
        raise InvalidArgument(f"{where}.name must be a string, not {_kind(name)}")
    parameters = _parameters(output, f"output {name!r}")
    _refuse_shared_memory(parameters, f"output {name!r}")
    if "classification" in parameters:
        raise InvalidArgument(f"output {name!r}: classification (parameters.classification) is not supported")
    binary = parameters.get("binary_data")
    if binary is not None and type(binary) is not bool:
        raise InvalidArgument(f"output {name!r}: parameters.binary_data must be true or false, not {_kind(binary)}")
    return RequestedOutput(name, binary)


def _parameters(item: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = item.get("parameters", {})
    if type(parameters) is not dict:
        raise InvalidArgument(f"{where}: parameters must be a JSON object, not {_kind(parameters)}")
    return parameters


def _refuse_shared_memory(parameters: dict[str, Any], where: str) -> None:
    if any(key.startswith("shared_memory_") for key in parameters):
        raise InvalidArgument(
            f"{where}: shared memory (parameters.shared_memory_region) is not supported: send the data in the body"
        )


def _object(value: Any, where: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise InvalidArgument(f"{where} must be a JSON object, not {_kind(value)}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if type(value) is not list:
        raise InvalidArgument(f"{where} must be a list, not {_kind(value)}")
    return value


_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string"}


def _kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words."""
    if type(value) is list:
        return "a list"
    if type(value) is dict:
        return "an object"
    return _KINDS.get(type(value), type(value).__name__)


def _describe(value: Any) -> str:
    """What stands where a list of integers should: a list by the first item that is no integer."""
    for item in value if type(value) is list else ():
        if type(item) is not int:
            return f"a list holding {_found(item)}"
    return _found(value)


def _found(value: Any) -> str:
    """A JSON value for a message: a scalar as itself (cut short), a string or container by kind."""
    if value is None or type(value) in (bool, int, float):
        text = json.dumps(value)
        return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} digits)"
    return _kind(value)


# ---------------------------------------------------------------------------- JSON data -> raw bytes


def _raw_from_json(name: str, datatype: str, shape: list[int], data: Any) -> bytes:
    """JSON "data" of a checked datatype and shape as raw little-endian bytes."""
    if type(data) is not list:
        raise InvalidArgument(f"input {name!r}: data must be a list, not {_kind(data)}")
    flat = _flattened(name, shape, data)
    return _ENCODERS[datatype](name, datatype, flat)


def _flattened(name: str, shape: list[int], data: list[Any]) -> list[Any]:
    """The elements of data in row-major order: flat, or nested exactly as the shape (every
    list at each dimension of its size). Never descends deeper than the shape's rank."""
    elements = math.prod(shape)
    if len(shape) < 2 or not data or type(data[0]) is not list:
        if len(data) != elements:
            raise InvalidArgument(f"input {name!r}: data has {len(data)} values, shape {shape} needs {elements}")
        return data
    level: list[Any] = [data]
    for dim, size in enumerate(shape):
        kinds = set(map(type, level))
        if level and kinds != {list}:
            found = next(row for row in level if type(row) is not list)
            raise InvalidArgument(
                f"input {name!r}: data nested as shape {shape} needs lists at dimension {dim}, found {_found(found)}"
            )
        if set(map(len, level)) - {size}:
            found = next(row for row in level if len(row) != size)
            raise InvalidArgument(
                f"input {name!r}: data does not match shape {shape}: a list at dimension {dim}"
                f" has {len(found)} items, not {size}"
            )
        level = list(itertools.chain.from_iterable(level))
    return level


def _checked_kinds(name: str, datatype: str, flat: list[Any], allowed: tuple[type, ...], what: str) -> None:
    kinds = set(map(type, flat))
    if not kinds.issubset(allowed):
        found = next(value for value in flat if type(value) not in allowed)
        raise InvalidArgument(f"input {name!r}: {datatype} data must be {what}, found {_found(found)}")


def _int_code(size: int, signed: bool) -> str:
    """The array typecode of an integer of size bytes (in native order)."""
    codes = "bhilq" if signed else "BHILQ"
    return next(code for code in codes if array(code).itemsize == size)


_INTS: dict[str, tuple[str, int, int]] = {  # datatype -> (array typecode, min, max)
    f"{'U' if not signed else ''}INT{bits}": (
        _int_code(bits // 8, signed),
        -(2 ** (bits - 1)) if signed else 0,
        2 ** (bits - 1) - 1 if signed else 2**bits - 1,
    )
    for bits in (8, 16, 32, 64)
    for signed in (True, False)
}
_FLOATS = {"FP32": "f", "FP64": "d"}
_F32_BITS = _int_code(4, False)
_BF16_BITS = _int_code(2, False)


def _native(values: array[Any]) -> bytes:
    if _BIG_ENDIAN:
        values.byteswap()
    return values.tobytes()


def _encode_bool(name: str, datatype: str, flat: list[Any]) -> bytes:
    _checked_kinds(name, datatype, flat, (bool,), "true or false")
    return bytes(flat)


def _encode_int(name: str, datatype: str, flat: list[Any]) -> bytes:
    _checked_kinds(name, datatype, flat, (int,), "integers")
    code, low, high = _INTS[datatype]
    try:
        return _native(array(code, flat))
    except OverflowError:
        raise InvalidArgument(f"input {name!r}: a value in data does not fit in {datatype} ({low}..{high})") from None


def _encode_float(name: str, datatype: str, flat: list[Any]) -> bytes:
    _checked_kinds(name, datatype, flat, (float, int), "numbers")
    try:  # rounded to nearest; FP32 past its range is +-inf, as IEEE (and numpy, torch) have it
        return _native(array(_FLOATS[datatype], flat))
    except OverflowError:  # an integer past any float's range
        raise InvalidArgument(f"input {name!r}: a value in data does not fit in {datatype}") from None


def _encode_fp16(name: str, datatype: str, flat: list[Any]) -> bytes:
    _checked_kinds(name, datatype, flat, (float, int), "numbers")
    try:
        values = list(map(float, flat))
    except OverflowError:  # an integer past any float's range
        raise InvalidArgument(f"input {name!r}: a value in data does not fit in {datatype}") from None
    try:
        return struct.pack(f"<{len(values)}e", *values)
    except OverflowError:  # struct refuses what rounds past 65504, where IEEE rounds to +-inf
        big = 65520.0  # halfway from the largest FP16 (65504) to the next power of two
        values = [math.copysign(math.inf, v) if abs(v) >= big else v for v in values]
        return struct.pack(f"<{len(values)}e", *values)


def _encode_bf16(name: str, datatype: str, flat: list[Any]) -> bytes:
    """Each value as float32, then rounded to nearest even in its top 16 bits, as torch does
    (a NaN: the quiet 0x7FC0)."""
    _checked_kinds(name, datatype, flat, (float, int), "numbers")
    try:
        bits = array(_F32_BITS, array("f", flat).tobytes())
    except OverflowError:
        raise InvalidArgument(f"input {name!r}: a value in data does not fit in {datatype}") from None
    rounded = array(
        _BF16_BITS,
        [(b + 0x7FFF + ((b >> 16) & 1)) >> 16 if (b & 0x7FFFFFFF) <= 0x7F800000 else 0x7FC0 for b in bits],
    )
    return _native(rounded)


def _encode_bytes(name: str, datatype: str, flat: list[Any]) -> bytes:
    _checked_kinds(name, datatype, flat, (str,), "strings")
    try:
        items = [text.encode() for text in flat]
    except UnicodeEncodeError:  # a lone surrogate, from a \ud800 escape
        raise InvalidArgument(f"input {name!r}: a string in data is not valid Unicode (a lone surrogate)") from None
    return b"".join([part for item in items for part in (_LENGTH.pack(len(item)), item)])


_ENCODERS: dict[str, Callable[[str, str, list[Any]], bytes]] = {
    "BOOL": _encode_bool,
    **{datatype: _encode_int for datatype in _INTS},
    **{datatype: _encode_float for datatype in _FLOATS},
    "FP16": _encode_fp16,
    "BF16": _encode_bf16,
    BYTES: _encode_bytes,
}
assert set(SUPPORTED) <= set(_ENCODERS), "a supported datatype without a JSON codec"


# ---------------------------------------------------------------------------- responses


def encode_infer_response(
    model_name: str, model_version: str, request_id: str, outputs: list[Output], request: RestInferRequest
) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON when binary data follows it (the
    Inference-Header-Content-Length header; None: the body is plain JSON). An output goes as
    binary data when the request asks so for it (outputs[].parameters.binary_data), or for all
    (parameters.binary_data_output) unless it asks otherwise for that output."""
    asked = {output.name: output.binary for output in request.outputs}
    tensors = []
    parts: list[Any] = []
    for output in outputs:
        binary = asked.get(output.name)
        tensor: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if binary if binary is not None else request.binary_output:
            data = _binary(output)
            tensor["parameters"] = {"binary_data_size": memoryview(data).nbytes}
            parts.append(data)
        else:
            tensor["data"] = _json_data(output)
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id:
        response["id"] = request_id
    response["outputs"] = tensors
    # ASCII (every string escaped), NaN and +-Infinity as bare tokens (see the docstring).
    header = json.dumps(response, separators=(",", ":")).encode()
    if not parts:
        return header, None
    return b"".join([header, *parts]), len(header)


def error_body(message: str) -> bytes:
    """The body of an error response: {"error": message}."""
    return json.dumps({"error": message}).encode()


def _binary(output: Output) -> Any:
    if output.datatype == BYTES:
        return b"".join([part for item in output.data for part in (_LENGTH.pack(len(item)), item)])
    return output.data


def _json_data(output: Output) -> list[Any]:
    """An output's elements as a flat JSON list: numbers, true/false, strings."""
    datatype = output.datatype
    if datatype == BYTES:
        return _texts(output)
    data = memoryview(output.data).cast("B")
    if datatype == "BOOL":
        return list(map(bool, data))
    if datatype == "FP16":
        return list(struct.unpack(f"<{len(data) // 2}e", data))
    if datatype == "BF16":  # a bfloat16 is the top half of a float32: widen, then read as float32
        widened = bytearray(len(data) * 2)
        widened[2::4] = data[0::2]
        widened[3::4] = data[1::2]
        values = array("f", widened)
    else:
        code = _FLOATS.get(datatype) or _INTS[datatype][0]
        values = array(code)
        values.frombytes(data)
    if _BIG_ENDIAN:
        values.byteswap()
    return values.tolist()


def _texts(output: Output) -> list[str]:
    try:
        return [bytes(item).decode() for item in output.data]
    except UnicodeDecodeError:
        index = next(i for i, item in enumerate(output.data) if not _is_utf8(item))
        raise InvalidArgument(
            f"output {output.name!r}: element {index} is not UTF-8 text, which JSON data cannot carry:"
            ' ask for the output as binary data ("parameters": {"binary_data": true} on the output,'
            ' or "binary_data_output": true on the request)'
        ) from None


def _is_utf8(item: bytes) -> bool:
    try:
        bytes(item).decode()
    except UnicodeDecodeError:
        return False
    return True
