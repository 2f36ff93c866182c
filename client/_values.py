"""Python values, torch tensors and numpy arrays <-> wire values (deployd.v1.Value)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from deployd_wire.dtypes import DTYPES
from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.tensors import TORCH_DTYPES, tensor_bytes

_DTYPES: dict[torch.dtype, int] = {TORCH_DTYPES[dtype.name]: pb.DType.Value(dtype.proto_enum) for dtype in DTYPES}
_TORCH_DTYPES = {wire: dtype for dtype, wire in _DTYPES.items()}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Results at least this large wrap the received bytes; smaller ones are copied (tiny bytes
# objects may be shared interpreter-wide singletons, and copying them costs nothing).
_WRAP_BYTES = 64 * 1024


def to_wire(value: Any, out: pb.Value) -> None:
    """Fill out with the wire form of value. Raises TypeError or ValueError for what cannot go."""
    if value is None:
        out.none_value = pb.NONE_VALUE
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"integer {value} does not fit in int64")
        out.int_value = value
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out.bytes_value = bytes(value)
    elif isinstance(value, torch.Tensor):
        _tensor_to_wire(value, out.tensor_value)
    elif hasattr(type(value), "__deployd_ref__"):  # an Obj (client._sessions): it stays in its worker
        out.obj_ref.session_id, out.obj_ref.obj_id = value.__deployd_ref__()
    elif isinstance(value, tuple):
        for item in value:
            to_wire(item, out.tuple_value.items.add())
        out.tuple_value.SetInParent()
    elif isinstance(value, list):
        for item in value:
            to_wire(item, out.list_value.items.add())
        out.list_value.SetInParent()
    elif isinstance(value, dict):
        for key, item in value.items():
            entry = out.dict_value.entries.add()
            if isinstance(key, str):
                entry.string_key = key
            elif isinstance(key, int) and not isinstance(key, bool):
                entry.int_key = key
            else:
                raise TypeError(f"dict keys must be str or int, not {type(key).__qualname__}")
            to_wire(item, entry.value)
        out.dict_value.SetInParent()
    elif type(value).__module__ == "numpy":  # numpy is optional: never imported here
        if type(value).__name__ == "ndarray":
            _tensor_to_wire(torch.from_numpy(value.copy()), out.tensor_value)  # copy: C order, positive strides
        else:
            to_wire(value.item(), out)  # a numpy scalar
    else:
        raise TypeError(f"a value of type {type(value).__qualname__} cannot be sent to deployd")


def _tensor_to_wire(tensor: torch.Tensor, out: pb.Tensor) -> None:
    wire_dtype = _DTYPES.get(tensor.dtype)
    if wire_dtype is None:
        raise TypeError(f"tensors of dtype {tensor.dtype} cannot be sent to deployd")
    out.dtype = wire_dtype  # type: ignore[assignment]
    out.shape.extend(tensor.shape)
    out.data = bytes(tensor_bytes(tensor))  # one copy: a view of a dense tensor, copied into the message


def from_wire(value: pb.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "tensor_value":
        return _tensor_from_wire(value.tensor_value)
    if kind == "list_value":
        return [from_wire(item) for item in value.list_value.items]
    if kind == "tuple_value":
        return tuple(from_wire(item) for item in value.tuple_value.items)
    if kind == "dict_value":
        return {
            getattr(entry, entry.WhichOneof("key") or "string_key"): from_wire(entry.value)
            for entry in value.dict_value.entries
        }
    if kind == "none_value" or kind is None:
        return None
    return getattr(value, kind)


def _tensor_from_wire(tensor: pb.Tensor) -> torch.Tensor:
    dtype = _TORCH_DTYPES[tensor.dtype]
    shape = list(tensor.shape)
    data = tensor.data  # each read of a bytes field copies it: read it once
    if not data:
        return torch.empty(shape, dtype=dtype)
    if len(data) < _WRAP_BYTES:
        # bytearray: a writable buffer, so the tensor owns ordinary mutable memory.
        flat = torch.frombuffer(bytearray(data), dtype=dtype)
    else:
        # Large: wrap the bytes object the message just handed us instead of copying it
        # again (a fresh copy page-faults). It is a new object only this tensor holds, so
        # writing through the tensor is safe even though bytes are immutable by convention.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(data, dtype=dtype)
    return flat if len(shape) == 1 else flat.reshape(shape)
