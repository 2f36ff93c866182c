"""Wire values (deployd.v1.Value) <-> packed values (server.protocol), in the daemon.

The daemon never builds tensors: it checks that a tensor's bytes match its dtype and
shape, and hands the bytes on as a buffer.
"""

from __future__ import annotations

import math
from typing import Any

from server.errors import InvalidValue
from server.proto import deployd_pb2 as pb

# DType enum value -> (name used in packed values, bytes per element)
_DTYPES: dict[int, tuple[str, int]] = {
    pb.DTYPE_FLOAT16: ("float16", 2),
    pb.DTYPE_FLOAT32: ("float32", 4),
    pb.DTYPE_FLOAT64: ("float64", 8),
    pb.DTYPE_BFLOAT16: ("bfloat16", 2),
    pb.DTYPE_INT8: ("int8", 1),
    pb.DTYPE_INT16: ("int16", 2),
    pb.DTYPE_INT32: ("int32", 4),
    pb.DTYPE_INT64: ("int64", 8),
    pb.DTYPE_UINT8: ("uint8", 1),
    pb.DTYPE_BOOL: ("bool", 1),
    pb.DTYPE_COMPLEX64: ("complex64", 8),
    pb.DTYPE_COMPLEX128: ("complex128", 16),
}
_DTYPE_BY_NAME = {name: dtype for dtype, (name, _) in _DTYPES.items()}
MAX_DEPTH = 64


def unpack_value(value: pb.Value, buffers: list[Any], depth: int = 0) -> Any:
    """A wire value as a packed value; tensor bytes are appended to buffers."""
    if depth > MAX_DEPTH:
        raise InvalidValue(f"value nested deeper than {MAX_DEPTH} levels")
    kind = value.WhichOneof("kind")
    if kind == "tensor_value":
        return _unpack_tensor(value.tensor_value, buffers)
    if kind == "list_value":
        return [unpack_value(item, buffers, depth + 1) for item in value.list_value.items]
    if kind == "tuple_value":
        return ("tuple", [unpack_value(item, buffers, depth + 1) for item in value.tuple_value.items])
    if kind == "dict_value":
        return {_entry_key(entry): unpack_value(entry.value, buffers, depth + 1) for entry in value.dict_value.entries}
    if kind == "none_value":
        return None
    if kind is None:
        raise InvalidValue("a Value with no kind set")
    return getattr(value, kind)


def _entry_key(entry: pb.DictEntry) -> str | int:
    key = entry.WhichOneof("key")
    if key is None:
        raise InvalidValue("a dict entry with no key set")
    result: str | int = getattr(entry, key)
    return result


def _unpack_tensor(tensor: pb.Tensor, buffers: list[Any]) -> tuple[str, str, list[int], int]:
    if tensor.dtype not in _DTYPES:
        raise InvalidValue(f"unknown tensor dtype {tensor.dtype}")
    name, itemsize = _DTYPES[tensor.dtype]
    shape = list(tensor.shape)
    if any(size < 0 for size in shape):
        raise InvalidValue(f"tensor shape {shape} has a negative size")
    expected = math.prod(shape) * itemsize
    data = tensor.data  # each read of a bytes field copies it: read it once
    if len(data) != expected:
        raise InvalidValue(f"tensor of dtype {name} and shape {shape} needs {expected} bytes of data, got {len(data)}")
    buffers.append(data)
    return ("tensor", name, shape, len(buffers) - 1)


def pack_value(packed: Any, buffers: list[Any], out: pb.Value) -> None:
    """Fill out with the wire form of a packed value whose tensors refer to buffers."""
    kind = type(packed)
    if packed is None:
        out.none_value = pb.NONE_VALUE
    elif kind is bool:
        out.bool_value = packed
    elif kind is int:
        out.int_value = packed
    elif kind is float:
        out.double_value = packed
    elif kind is str:
        out.string_value = packed
    elif kind is bytes:
        out.bytes_value = packed
    elif kind is list:
        items = out.list_value.items
        for item in packed:
            pack_value(item, buffers, items.add())
        out.list_value.SetInParent()  # an empty list is still a list
    elif kind is dict:
        entries = out.dict_value.entries
        for key, item in packed.items():
            entry = entries.add()
            if type(key) is str:
                entry.string_key = key
            else:
                entry.int_key = key
            pack_value(item, buffers, entry.value)
        out.dict_value.SetInParent()
    elif packed[0] == "tuple":
        items = out.tuple_value.items
        for item in packed[1]:
            pack_value(item, buffers, items.add())
        out.tuple_value.SetInParent()
    else:
        _, name, shape, index = packed
        out.tensor_value.dtype = _DTYPE_BY_NAME[name]  # type: ignore[assignment]
        out.tensor_value.shape.extend(shape)
        out.tensor_value.data = bytes(buffers[index])
