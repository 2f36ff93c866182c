"""Packed values (see server.ipc.protocol) <-> Python objects and torch tensors, in a worker."""

from __future__ import annotations

from typing import Any

import torch

from deployd_wire.tensors import DTYPE_NAMES, TORCH_DTYPES, tensor_bytes, tensor_from_buffer
from server.ipc.protocol import FAILURE_NOT_FOUND
from server.worker.failures import RequestFailed

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Nesting a result may have: protobuf parses at most 100 nested messages, and a level of dict
# takes 3 (Value, DictValue, DictEntry), so 33 levels is what a client can still read.
MAX_DEPTH = 32


def unpack(packed: Any, buffers: list[Any], objects: dict[int, Any] | None = None) -> Any:
    """Rebuild Python objects from a packed value; tensors wrap their buffers without a copy.
    objects: the session's objects, which ("obj", number) refers to (the daemon checked them)."""
    kind = type(packed)
    if kind is list:
        return [unpack(item, buffers, objects) for item in packed]
    if kind is dict:
        return {key: unpack(item, buffers, objects) for key, item in packed.items()}
    if kind is tuple:
        if packed[0] == "tuple":
            return tuple(unpack(item, buffers, objects) for item in packed[1])
        if packed[0] == "obj":
            if objects is None or packed[1] not in objects:
                raise RequestFailed(FAILURE_NOT_FOUND, f"no object {packed[1]} in this session in this worker")
            return objects[packed[1]]
        _, dtype_name, shape, index = packed
        return tensor_from_buffer(buffers[index], TORCH_DTYPES[dtype_name], shape)
    return packed


def pack(value: Any, buffers: list[Any], depth: int = 0) -> Any:
    """Turn a result of model code into a packed value, appending tensor bytes to buffers.

    Raises TypeError or ValueError for what the wire cannot carry.
    """
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value if value is None else bool(value)
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"integer {value} does not fit in int64")
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, torch.Tensor):
        return pack_tensor(value, buffers)
    if isinstance(value, tuple):
        return ("tuple", [pack(item, buffers, depth + 1) for item in value])
    if isinstance(value, list):
        return [pack(item, buffers, depth + 1) for item in value]
    if isinstance(value, dict):
        return {_dict_key(key): pack(item, buffers, depth + 1) for key, item in value.items()}
    if type(value).__module__ == "numpy":  # without importing numpy: it is an optional extern
        if type(value).__name__ == "ndarray":
            return pack_tensor(torch.from_numpy(value.copy()), buffers)  # copy: C order, positive strides
        return pack(value.item(), buffers, depth)  # a numpy scalar
    raise TypeError(f"a value of type {type(value).__qualname__} cannot be sent over the wire")


def _dict_key(key: Any) -> Any:
    if isinstance(key, str) and not isinstance(key, bool):
        return str(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return int(key)
    raise TypeError(f"dict keys must be str or int, not {type(key).__qualname__}")


def pack_tensor(tensor: torch.Tensor, buffers: list[Any]) -> tuple[str, str, list[int], int]:
    dtype_name = DTYPE_NAMES.get(tensor.dtype)
    if dtype_name is None:
        raise TypeError(f"tensors of dtype {tensor.dtype} cannot be sent over the wire")
    if tensor.device.type != "cpu":  # a model on a GPU: its results come back for the wire
        tensor = tensor.detach().cpu()
    buffers.append(tensor_bytes(tensor))
    return ("tensor", dtype_name, list(tensor.shape), len(buffers) - 1)
