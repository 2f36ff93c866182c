"""The tensor-argument language: one ARG of text -> a Python value or a torch tensor.

    2  1.5  '"text"'  true  null  '[1, 2]'  '{"k": 1}'   JSON (a string needs its quotes)
    'tensor:[[1,2],[3,4]]'  'tensor:int64:[1,2]'         a tensor from nested JSON lists
    ones:1,3,8,8  zeros:2,2  rand:2,3  ones:int64:2,2    a tensor of that shape

`deployd invoke` parses its ARGs with it (deployd_cli), and the daemon's workers parse a
model's warmup inputs (server.worker.warmup). The daemon itself checks warmup inputs when it
reads its config without building them (check_arg): it never imports torch, so torch is
imported only when a tensor is built.

BadArg for text that is neither JSON nor a tensor spec, or whose value does not fit.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, NamedTuple

from deployd_wire.dtypes import DTYPES

if TYPE_CHECKING:
    import torch

# complex dtypes have no literal form in ARG
TENSOR_DTYPES = tuple(dtype.name for dtype in DTYPES if not dtype.name.startswith("complex"))
_FLOAT_DTYPES = ("float16", "float32", "float64", "bfloat16")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class BadArg(ValueError):
    """An ARG that is neither JSON nor a tensor spec, or one whose value does not fit."""


class _TensorSpec(NamedTuple):
    """A tensor ARG read but not built: kind "tensor" with its values, or ones/zeros/rand with a shape."""

    kind: str
    dtype: str  # torch's attribute name
    values: Any  # nested lists (kind "tensor")
    shape: list[int]  # the other kinds


def parse_arg(text: str) -> Any:
    """One ARG: a tensor spec (tensor:, ones:, zeros:, rand:) or a JSON value."""
    read = _read(text)
    return _build(read, text) if isinstance(read, _TensorSpec) else read


def check_arg(text: str) -> None:
    """Raise BadArg for an ARG that parse_arg would refuse, without building it (no torch).

    A `tensor:` whose values torch cannot take (a ragged list, a value out of its dtype's
    range) passes here when it has the right form, and fails where it is built."""
    read = _read(text)
    if isinstance(read, _TensorSpec) and read.kind == "tensor" and not _is_numeric_block(read.values):
        raise BadArg(f"ARG {text!r}: not a tensor of nested JSON lists (the lists must be numbers, all rows alike)")


def _read(text: str) -> Any:
    """A JSON value, or a _TensorSpec: everything parse_arg checks before torch."""
    kind, colon, rest = text.partition(":")
    if colon and kind in ("tensor", "ones", "zeros", "rand"):
        return _read_tensor(kind, rest, text)
    try:
        value = json.loads(text)
    except ValueError:
        hint = f" (a string is JSON-quoted: '\"{text}\"')" if text.isidentifier() else ""
        raise BadArg(f"ARG {text!r} is neither JSON nor a tensor spec{hint}") from None
    _check_ints(value, text)
    return value


def _check_ints(value: Any, text: str) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
        raise BadArg(f"ARG {text!r}: integer {value} does not fit in int64")
    if isinstance(value, list):
        for item in value:
            _check_ints(item, text)
    elif isinstance(value, dict):
        for item in value.values():
            _check_ints(item, text)


def _read_tensor(kind: str, rest: str, text: str) -> _TensorSpec:
    name, colon, tail = rest.partition(":")
    dtype_name = "float32"
    if colon and name.isidentifier():
        if name not in TENSOR_DTYPES:
            raise BadArg(f"ARG {text!r}: unknown dtype {name!r} (one of: {', '.join(TENSOR_DTYPES)})")
        dtype_name, rest = name, tail
    if kind == "rand" and dtype_name not in _FLOAT_DTYPES:
        raise BadArg(f"ARG {text!r}: rand: makes floating-point tensors only")
    if kind == "tensor":
        try:
            return _TensorSpec(kind, dtype_name, json.loads(rest), [])
        except ValueError as error:
            raise BadArg(f"ARG {text!r}: not a tensor of nested JSON lists ({error})") from None
    try:
        shape = [int(size) for size in rest.split(",")]
    except ValueError:
        raise BadArg(f"ARG {text!r}: {kind}: takes a shape like 2,3 (non-negative integers)") from None
    if any(size < 0 for size in shape):
        raise BadArg(f"ARG {text!r}: {kind}: takes a shape of non-negative integers")
    return _TensorSpec(kind, dtype_name, None, shape)


def _build(spec: _TensorSpec, text: str) -> torch.Tensor:
    import torch  # only where a tensor is built: the daemon never imports torch

    dtype = getattr(torch, spec.dtype)
    if spec.kind == "tensor":
        try:
            return torch.tensor(spec.values, dtype=dtype)
        except (ValueError, TypeError, RuntimeError, OverflowError) as error:
            raise BadArg(f"ARG {text!r}: not a tensor of nested JSON lists ({error})") from None
    make = {"ones": torch.ones, "zeros": torch.zeros, "rand": torch.rand}[spec.kind]
    try:
        return make(spec.shape, dtype=dtype)
    except RuntimeError as error:
        raise BadArg(f"ARG {text!r}: {error}") from None


def _is_numeric_block(values: Any) -> bool:
    """A number, or nested lists of numbers whose rows at each depth all have one shape."""
    return _block_shape(values) is not None


def _block_shape(values: Any) -> tuple[int, ...] | None:
    if isinstance(values, (bool, int, float)):
        return ()
    if not isinstance(values, list):
        return None
    shapes = {_block_shape(item) for item in values}
    if not values:
        return (0,)
    if len(shapes) != 1 or None in shapes:
        return None
    (inner,) = shapes
    return (len(values), *inner)  # type: ignore[misc]
