"""The tensor-argument language of `deployd invoke`, both ways: an ARG (or a --kwarg value) on
the command line -> a Python value or a torch tensor (parse_arg), and a result -> one line of JSON
(to_json). ARGS_HELP is the language as `deployd invoke --help` shows it.

No daemon and no client here: text in, values out, and BadArg (exit 2 in deployd_cli.commands)
for text that is neither JSON nor a tensor spec.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

from deployd_wire.dtypes import DTYPES

if TYPE_CHECKING:
    import torch

MAX_PRINTED_VALUES = 1000

ARGS_HELP = """

An ARG (and a --kwarg value) is JSON, or a tensor:
  2  1.5  '"text"'  true  null  '[1, 2]'  '{"k": 1}'    JSON (a string needs its quotes)
  'tensor:[[1,2],[3,4]]'                               float32 from nested JSON lists
  'tensor:int64:[1,2]'                                 any dtype: float16 float32 float64
                                                       bfloat16 int8 int16 int32 int64 uint8 bool
  ones:1,3,8,8  zeros:2,2  rand:2,3  ones:int64:2,2    float32 (or the dtype) of that shape
The result prints as one line of JSON: a tensor as {"tensor": {"dtype", "shape", "values"}}
(over 1000 values: the first 1000, flattened, unless --full), tuples as lists, bytes as
{"bytes_base64": ...}."""

# complex dtypes have no literal form in ARG
_TENSOR_DTYPES = tuple(dtype.name for dtype in DTYPES if not dtype.name.startswith("complex"))
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class BadArg(ValueError):
    """An ARG that is neither JSON nor a tensor spec, or one whose value does not fit."""


def parse_arg(text: str) -> Any:
    """One ARG: a tensor spec (tensor:, ones:, zeros:, rand:) or a JSON value."""
    kind, colon, rest = text.partition(":")
    if colon and kind in ("tensor", "ones", "zeros", "rand"):
        return _parse_tensor(kind, rest, text)
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


def _parse_tensor(kind: str, rest: str, text: str) -> torch.Tensor:
    import torch  # only invoke needs it

    name, colon, tail = rest.partition(":")
    dtype_name = "float32"
    if colon and name.isidentifier():
        if name not in _TENSOR_DTYPES:
            raise BadArg(f"ARG {text!r}: unknown dtype {name!r} (one of: {', '.join(_TENSOR_DTYPES)})")
        dtype_name, rest = name, tail
    if kind == "rand" and dtype_name not in ("float16", "float32", "float64", "bfloat16"):
        raise BadArg(f"ARG {text!r}: rand: makes floating-point tensors only")
    dtype = getattr(torch, dtype_name)
    if kind == "tensor":
        try:
            values = json.loads(rest)
            return torch.tensor(values, dtype=dtype)
        except (ValueError, TypeError, RuntimeError, OverflowError) as error:
            raise BadArg(f"ARG {text!r}: not a tensor of nested JSON lists ({error})") from None
    try:
        shape = [int(size) for size in rest.split(",")]
    except ValueError:
        raise BadArg(f"ARG {text!r}: {kind}: takes a shape like 2,3 (non-negative integers)") from None
    if any(size < 0 for size in shape):
        raise BadArg(f"ARG {text!r}: {kind}: takes a shape of non-negative integers")
    make = {"ones": torch.ones, "zeros": torch.zeros, "rand": torch.rand}[kind]
    try:
        return make(shape, dtype=dtype)
    except RuntimeError as error:
        raise BadArg(f"ARG {text!r}: {error}") from None


def to_json(value: Any, *, full: bool = False) -> Any:
    """A result as JSON: tensors as {"tensor": {...}}, tuples as lists, bytes as base64."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return {"tensor": _tensor_json(value, full)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes_base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [to_json(item, full=full) for item in value]
    if isinstance(value, dict):
        return {
            (key if isinstance(key, str) else json.dumps(to_json(key, full=full))): to_json(item, full=full)
            for key, item in value.items()
        }
    if isinstance(value, complex):
        return [value.real, value.imag]
    return repr(value)


def _tensor_json(tensor: torch.Tensor, full: bool) -> dict[str, Any]:
    import torch

    dtype = str(tensor.dtype).removeprefix("torch.")
    description: dict[str, Any] = {"dtype": dtype, "shape": list(tensor.shape)}
    if tensor.is_complex():  # JSON has no complex numbers: [real, imag] pairs
        tensor = torch.view_as_real(tensor.resolve_conj())
    if full or tensor.numel() <= MAX_PRINTED_VALUES:
        description["values"] = tensor.tolist()
    else:
        description["values"] = tensor.reshape(-1)[:MAX_PRINTED_VALUES].tolist()
        description["truncated"] = (
            f"the first {MAX_PRINTED_VALUES} of {tensor.numel()} values, flattened in C order; --full prints all"
        )
    return description
