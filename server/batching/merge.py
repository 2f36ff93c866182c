"""Joining calls into one and splitting the result back, on packed values (server.ipc.protocol).

A call can join a batch when every tensor among its arguments has the same number of rows
(dim 0, at least one tensor): its rows. Calls join the same batch when their arguments are
alike but for those rows: the same structure, tensors of the same dtype and the same shape
after dim 0, and equal values everywhere else. `batch_key` is that likeness, as a hashable
value. Tensors are dense C-order bytes, so stacking along dim 0 is laying the callers'
bytes end to end: `merge` makes each batched tensor a Gathered buffer of their parts (no
copy here; the parts are copied once, straight into the worker's inbox).

`split` cuts a batched result back into each caller's rows: every tensor in it must have the
batch's rows on dim 0; the pieces are views of the reply's memory, not copies.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from deployd_wire.dtypes import BY_NAME
from server.errors import InvalidArgument
from server.ipc.protocol import Gathered


class Unbatchable(Exception):
    """A call that cannot join a batch: it runs on its own."""


def rows_of(args: list[Any], kwargs: dict[str, Any]) -> int:
    """The rows a call brings to a batch; Unbatchable if it has no tensor, a 0-d tensor, or
    tensors of different row counts."""
    counts = {shape[0] if shape else -1 for shape in _tensor_shapes([args, kwargs])}
    if not counts:
        raise Unbatchable("no tensor argument")
    if len(counts) > 1 or -1 in counts:
        raise Unbatchable("its tensors do not share a dim 0")
    return counts.pop()


def _tensor_shapes(value: Any) -> list[list[int]]:
    kind = type(value)
    if kind is list:
        return [shape for item in value for shape in _tensor_shapes(item)]
    if kind is dict:
        return [shape for item in value.values() for shape in _tensor_shapes(item)]
    if kind is tuple:
        if value[0] == "tensor":
            return [value[2]]
        return _tensor_shapes(value[1])
    return []


def batch_key(method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """What calls must share to join one batch, hashable."""
    return (method, _key(args), _key(kwargs))


def _key(value: Any) -> Any:
    kind = type(value)
    if kind is list:
        return ("list", tuple(_key(item) for item in value))
    if kind is dict:
        return ("dict", tuple((key, _key(item)) for key, item in value.items()))
    if kind is tuple:
        if value[0] == "tensor":
            return ("tensor", value[1], tuple(value[2][1:]))
        return ("tuple", tuple(_key(item) for item in value[1]))
    return (kind.__name__, value)  # the type too: 1, 1.0 and True are equal but not alike


class Merged(NamedTuple):
    args: list[Any]
    kwargs: dict[str, Any]
    buffers: list[Any]


def merge(calls: list[tuple[list[Any], dict[str, Any], list[Any]]], rows: list[int]) -> Merged:
    """One call's arguments from several alike calls ((args, kwargs, buffers) each, with their
    rows): each tensor the callers' tensors stacked along dim 0, as a Gathered buffer."""
    buffers: list[Any] = []
    total = sum(rows)
    args = _merge([call[0] for call in calls], [call[2] for call in calls], total, buffers)
    kwargs = _merge([call[1] for call in calls], [call[2] for call in calls], total, buffers)
    return Merged(args, kwargs, buffers)


def _merge(values: list[Any], buffer_lists: list[list[Any]], total: int, out: list[Any]) -> Any:
    first = values[0]
    kind = type(first)
    if kind is list:
        return [_merge([value[i] for value in values], buffer_lists, total, out) for i in range(len(first))]
    if kind is dict:
        return {key: _merge([value[key] for value in values], buffer_lists, total, out) for key in first}
    if kind is tuple:
        if first[0] == "tensor":
            parts = [buffers[value[3]] for value, buffers in zip(values, buffer_lists, strict=True)]
            out.append(Gathered(parts))
            return ("tensor", first[1], [total, *first[2][1:]], len(out) - 1)
        items = [value[1] for value in values]
        return ("tuple", [_merge([item[i] for item in items], buffer_lists, total, out) for i in range(len(first[1]))])
    return first  # equal in every call (the batch key says so)


def split(result: Any, buffers: list[Any], rows: list[int]) -> list[tuple[Any, list[Any]]]:
    """Each caller's part of a batched result: (packed value, its buffers), in caller order.

    InvalidArgument when the result does not split: a tensor whose dim 0 is not the batch's
    rows, or a value that is not a tensor (or a tuple, list or dict of them).
    """
    total = sum(rows)
    starts = [sum(rows[:index]) for index in range(len(rows))]
    pieces: list[tuple[Any, list[Any]]] = []
    for start, count in zip(starts, rows, strict=True):
        own: list[Any] = []
        pieces.append((_split(result, buffers, start, count, total, own), own))
    return pieces


def _split(value: Any, buffers: list[Any], start: int, count: int, total: int, out: list[Any]) -> Any:
    kind = type(value)
    if kind is list:
        return [_split(item, buffers, start, count, total, out) for item in value]
    if kind is dict:
        return {key: _split(item, buffers, start, count, total, out) for key, item in value.items()}
    if kind is tuple:
        if value[0] == "tensor":
            _, dtype, shape, index = value
            if not shape or shape[0] != total:
                raise InvalidArgument(
                    f"the model's result does not split into its callers' rows: a tensor of shape {list(shape)}"
                    f" answers a batch of {total} rows (with batching on, every tensor of the result needs"
                    " the batch on dim 0)"
                )
            row_bytes = math.prod(shape[1:]) * BY_NAME[dtype].itemsize
            out.append(memoryview(buffers[index]).cast("B")[start * row_bytes : (start + count) * row_bytes])
            return ("tensor", dtype, [count, *shape[1:]], len(out) - 1)
        return ("tuple", [_split(item, buffers, start, count, total, out) for item in value[1]])
    raise InvalidArgument(
        f"the model's result does not split into its callers' rows: it holds a {type(value).__name__}"
        " (with batching on, a result must be a tensor, or a tuple, list or dict of tensors)"
    )
