"""Wire values (deployd.v1.Value) <-> packed values (server.ipc.protocol), in the daemon.

The daemon never builds tensors: it checks that a tensor's bytes match its dtype and
shape, and hands the bytes on as a buffer. A value past one of the configured limits
(config section `limits`, given by the servicer) is refused with an InvalidValue that
names the limit's key.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from deployd_wire.dtypes import DTYPES
from deployd_wire.proto import deployd_pb2 as pb
from server.errors import InvalidArgument, InvalidValue

# DType enum value -> (name used in packed values, bytes per element)
_DTYPES: dict[int, tuple[str, int]] = {
    pb.DType.Value(dtype.proto_enum): (dtype.name, dtype.itemsize) for dtype in DTYPES
}
_DTYPE_BY_NAME = {name: dtype for dtype, (name, _) in _DTYPES.items()}
_INT64_MAX = 2**63 - 1


class ValueLimits(NamedTuple):
    """What one wire value may hold (config section `limits`, same names)."""

    max_value_depth: int = 32  # the worker's own limit too (server.worker.values)
    max_tensor_rank: int = 32
    max_tensor_elements: int = 1 << 31
    max_container_items: int = 1 << 20


DEFAULT_LIMITS = ValueLimits()


class ShapeWording(NamedTuple):
    """How check_shape words its refusals, one protocol's: the exception class and str.format
    templates, with {name} (the tensor's name, as the protocol says it), {rank}, {shape},
    {elements}, {limit} and {key} (the limit's key in config section `limits`)."""

    error: type[InvalidArgument]
    rank: str
    negative: str
    overflow: str
    elements: str


# deployd.v1 tensors: unnamed (a tensor sits anywhere in a Value).
V1_SHAPE_WORDING = ShapeWording(
    InvalidValue,
    rank="a tensor of {rank} dimensions, over the limit of {limit} (limits.max_tensor_rank)",
    negative="tensor shape {shape} has a negative size",
    overflow="tensor shape {shape} is too large: its sizes overflow int64",
    elements="a tensor of shape {shape} has {elements} elements, over the limit of {limit} (limits.{key})",
)


def check_shape(
    shape: list[int],
    itemsize: int,
    limits: ValueLimits,
    wording: ShapeWording,
    name: str = "",
    *,
    max_elements: int | None = None,
    limit_key: str = "max_tensor_elements",
    before_elements: Callable[[list[int]], None] | None = None,
) -> int:
    """The checks of a tensor's shape, whichever protocol carried it: its rank, no negative
    size, byte sizes within int64, its element count within max_elements (default
    limits.max_tensor_elements, whose key is limit_key). Refused with wording's exception and
    messages; before_elements: a further check, made just before the element count's.
    Returns the element count."""
    if len(shape) > limits.max_tensor_rank:
        raise wording.error(wording.rank.format(name=name, rank=len(shape), limit=limits.max_tensor_rank))
    if before_elements is None and min(shape, default=1) > 0:
        # The common case in fewer steps (every call's tensors): no size 0 or negative, so the
        # element count is also what the byte sizes are made of.
        elements = math.prod(shape)
        limit = limits.max_tensor_elements if max_elements is None else max_elements
        if elements * itemsize <= _INT64_MAX and elements <= limit:
            return elements
    if any(size < 0 for size in shape):
        raise wording.error(wording.negative.format(name=name, shape=shape))
    if math.prod(max(size, 1) for size in shape) * itemsize > _INT64_MAX:
        # An empty tensor's other sizes still make its strides and byte sizes: torch or numpy
        # in the worker would refuse it.
        raise wording.error(wording.overflow.format(name=name, shape=shape))
    if before_elements is not None:
        before_elements(shape)
    elements = math.prod(shape)
    limit = limits.max_tensor_elements if max_elements is None else max_elements
    if elements > limit:
        raise wording.error(
            wording.elements.format(name=name, shape=shape, elements=elements, limit=limit, key=limit_key)
        )
    return elements


# An Obj argument (Value.obj_ref) -> its number in the session of the call (server.models.sessions).
ObjResolver = Callable[[pb.ObjRef], int]


def unpack_value(
    value: pb.Value, buffers: list[Any], limits: ValueLimits = DEFAULT_LIMITS, objects: ObjResolver | None = None
) -> Any:
    """A wire value as a packed value; tensor bytes are appended to buffers. objects: how to
    take an Obj argument, in a session's call; None: an Obj is refused."""
    return _unpack(value, buffers, 0, limits, objects)


def _unpack(value: pb.Value, buffers: list[Any], depth: int, limits: ValueLimits, objects: ObjResolver | None) -> Any:
    if depth > limits.max_value_depth:
        raise InvalidValue(f"value nested deeper than {limits.max_value_depth} levels (limits.max_value_depth)")
    kind = value.WhichOneof("kind")
    if kind == "tensor_value":
        return _unpack_tensor(value.tensor_value, buffers, limits)
    if kind == "list_value":
        items = _checked_items(value.list_value.items, "list", limits)
        return [_unpack(item, buffers, depth + 1, limits, objects) for item in items]
    if kind == "tuple_value":
        items = _checked_items(value.tuple_value.items, "tuple", limits)
        return ("tuple", [_unpack(item, buffers, depth + 1, limits, objects) for item in items])
    if kind == "dict_value":
        entries = _checked_items(value.dict_value.entries, "dict", limits)
        return {_entry_key(entry): _unpack(entry.value, buffers, depth + 1, limits, objects) for entry in entries}
    if kind == "none_value":
        return None
    if kind == "obj_ref":
        if objects is None:
            raise InvalidValue("an Obj (obj_ref) can only be an argument of a session's call, in its own session")
        return ("obj", objects(value.obj_ref))
    if kind is None:
        raise InvalidValue("a Value with no kind set")
    return getattr(value, kind)


def _checked_items(items: Any, what: str, limits: ValueLimits) -> Any:
    if len(items) > limits.max_container_items:
        raise InvalidValue(
            f"a {what} of {len(items)} items, over the limit of {limits.max_container_items}"
            " (limits.max_container_items)"
        )
    return items


def _entry_key(entry: pb.DictEntry) -> str | int:
    key = entry.WhichOneof("key")
    if key is None:
        raise InvalidValue("a dict entry with no key set")
    result: str | int = getattr(entry, key)
    return result


def _unpack_tensor(tensor: pb.Tensor, buffers: list[Any], limits: ValueLimits) -> tuple[str, str, list[int], int]:
    if tensor.dtype not in _DTYPES:
        raise InvalidValue(f"unknown tensor dtype {tensor.dtype}")
    name, itemsize = _DTYPES[tensor.dtype]
    shape = list(tensor.shape)
    elements = check_shape(shape, itemsize, limits, V1_SHAPE_WORDING)
    expected = elements * itemsize
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
        tensor = out.tensor_value  # each read of a message field makes a view: read it once
        tensor.dtype = _DTYPE_BY_NAME[name]  # type: ignore[assignment]
        tensor.shape.extend(shape)
        tensor.data = bytes(buffers[index])
