"""A model's warmup, inside the worker: right after the object is unpickled, before the load is
answered (server.models.warmup says why there). Its inputs are ARGs, built here with torch
(deployd_wire.tensor_args), or the bytes of a torch.save file:
    a list or tuple             the positional arguments
    {"args": [...], "kwargs": {...}}   either key may be left out
"""

from __future__ import annotations

import io
import time
from typing import Any

import torch

from deployd_wire.tensor_args import BadArg, parse_arg
from server.ipc import protocol
from server.worker.devices import to_device
from server.worker.failures import RequestFailed


class WarmupFailed(RequestFailed):
    """The warmup could not run, or a call of it raised (then its __cause__)."""

    def __init__(self, message: str) -> None:
        super().__init__(protocol.FAILURE_INVALID_ARGUMENT, message)


def run_warmup(target: Any, warmup: tuple[Any, ...], device: torch.device | None = None) -> float:
    """Call target's method with the warmup's inputs (on the model's device), repeat times; the seconds it took."""
    method_name, texts, keyword_texts, data, repeat = warmup
    args, kwargs = _arguments(texts, keyword_texts, data)
    if device is not None:
        args, kwargs = to_device(args, device), to_device(kwargs, device)
    method = getattr(target, method_name, None)
    if not callable(method):
        raise WarmupFailed(f"warmup: {type(target).__qualname__} has no method {method_name!r}")
    started = time.monotonic()
    for number in range(1, repeat + 1):
        try:
            with torch.no_grad():
                method(*args, **kwargs)
        except Exception as error:  # model code may raise anything
            raise WarmupFailed(
                f"warmup call {number} of {repeat} ({method_name}) raised {type(error).__name__}: {error}"
            ) from error
    return time.monotonic() - started


def _arguments(texts: list[str], keyword_texts: dict[str, str], data: bytes) -> tuple[list[Any], dict[str, Any]]:
    if data:
        return _from_file(data)
    try:
        return [parse_arg(text) for text in texts], {name: parse_arg(text) for name, text in keyword_texts.items()}
    except BadArg as error:
        raise WarmupFailed(f"warmup inputs: {error}") from None


def _from_file(data: bytes) -> tuple[list[Any], dict[str, Any]]:
    try:
        # weights_only: tensors and containers, no pickled code.
        saved = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as error:  # torch raises many kinds for a file that is not its own
        why = f"{type(error).__name__}: {error}"
        raise WarmupFailed(f"warmup file: not a torch.save file of arguments: {why}") from None
    if isinstance(saved, (list, tuple)):
        return list(saved), {}
    if isinstance(saved, dict) and set(saved) <= {"args", "kwargs"}:
        args, kwargs = saved.get("args", []), saved.get("kwargs", {})
        if isinstance(args, (list, tuple)) and isinstance(kwargs, dict):
            return list(args), dict(kwargs)
    raise WarmupFailed(
        "warmup file: torch.save a list (or tuple) of positional arguments, or a dict of args and kwargs;"
        f" it holds a {type(saved).__name__}"
    )
