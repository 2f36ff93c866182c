"""Packed values (see server.protocol) <-> Python objects and torch tensors, in a worker."""

from __future__ import annotations

from typing import Any

import torch

# The dtypes the wire carries, by the names used in packed values and in the proto's DType.
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Nesting a result may have: protobuf parses at most 100 nested messages, and a level of dict
# takes 3 (Value, DictValue, DictEntry), so 33 levels is what a client can still read.
MAX_DEPTH = 32


def unpack(packed: Any, buffers: list[Any]) -> Any:
    """Rebuild Python objects from a packed value; tensors wrap their buffers without a copy."""
    kind = type(packed)
    if kind is list:
        return [unpack(item, buffers) for item in packed]
    if kind is dict:
        return {key: unpack(item, buffers) for key, item in packed.items()}
    if kind is tuple:
        if packed[0] == "tuple":
            return tuple(unpack(item, buffers) for item in packed[1])
        _, dtype_name, shape, index = packed
        return tensor_from_buffer(buffers[index], DTYPES[dtype_name], shape)
    return packed


def tensor_from_buffer(buffer: Any, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if len(buffer) == 0:  # frombuffer refuses empty buffers
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(buffer, dtype=dtype)
    return flat if len(shape) == 1 else flat.reshape(shape)


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
    dtype_name = _DTYPE_NAMES.get(tensor.dtype)
    if dtype_name is None:
        raise TypeError(f"tensors of dtype {tensor.dtype} cannot be sent over the wire")
    buffers.append(tensor_bytes(tensor))
    return ("tensor", dtype_name, list(tensor.shape), len(buffers) - 1)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as little-endian C-order bytes (a view when already dense)."""
    try:
        # The common case in one step: a dense CPU tensor numpy can see (not bfloat16, no
        # conj or neg bit, no grad); the cast fails for anything not C-contiguous.
        return memoryview(tensor.numpy()).cast("B")  # type: ignore[arg-type]
    except (TypeError, RuntimeError):
        pass
    dense = tensor.detach()
    if dense.layout != torch.strided:
        dense = dense.to_dense()
    flat = dense.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    if flat.stride(0) != 1:  # one element counts as contiguous whatever its stride; view() needs 1
        flat = flat.clone(memory_format=torch.contiguous_format)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]
