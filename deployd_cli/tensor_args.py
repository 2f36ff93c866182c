"""The tensor-argument language of `deployd invoke`, as the command line shows it: ARGS_HELP
(`deployd invoke --help`), and a result -> one line of JSON (to_json). An ARG's parser is
deployd_wire.tensor_args (the daemon parses a model's warmup inputs with it too); BadArg from
there is exit 2 in deployd_cli.commands.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

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
