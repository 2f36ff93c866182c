"""A model's device in a worker: the object moved there at load, a call's tensors moved there
before the call; results come back to the CPU for the wire (server.worker.values.pack_tensor).

A worker bound to a GPU sees that GPU alone (CUDA_VISIBLE_DEVICES, server.worker.boot.bind_gpu),
so "cuda" is the only CUDA device a worker is told of. CUDA starts here, in the worker, at the
first load on cuda: never in the fork server nor the daemon.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from server.ipc.protocol import FAILURE_INVALID_ARGUMENT, FAILURE_OUT_OF_MEMORY
from server.worker.failures import RequestFailed

CPU = "cpu"


def require_device(device: str) -> torch.device:
    """The torch device for LoadPickle's device ("cpu" or "cuda"); RequestFailed if this
    host (this worker) has none."""
    if device == CPU:
        return torch.device(CPU)
    if device != "cuda":
        raise RequestFailed(FAILURE_INVALID_ARGUMENT, f"unknown device {device!r} (cpu or cuda)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        why = (
            "torch is built without CUDA"
            if torch.version.cuda is None
            else "no CUDA device is visible (no driver or GPU found"
            + (f"; CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ")")
        )
        raise RequestFailed(FAILURE_INVALID_ARGUMENT, f"the model asks for cuda, but this host has no CUDA: {why}")
    return torch.device("cuda", 0)  # the one GPU this worker sees


@contextmanager
def out_of_memory_as_failure(doing: str) -> Iterator[None]:
    """CUDA's out-of-memory error as a Failure that says what ran out (the worker lives on)."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what the failed step held goes back to the GPU
        first = str(error).splitlines()[0] if str(error) else ""
        said = first if "out of memory" in first.lower() else f"CUDA out of memory: {first}".rstrip(": ")
        raise RequestFailed(FAILURE_OUT_OF_MEMORY, f"{doing}: {said}") from None


def move_object(loaded: Any, device: torch.device) -> Any:
    """The unpickled object on `device`: a Module (or anything with .to) moved whole; a tensor,
    or a container of them, moved item by item."""
    if device.type == CPU:
        return loaded
    with out_of_memory_as_failure(f"moving the model to {device}"):
        if isinstance(loaded, torch.nn.Module):
            return loaded.to(device)
        return to_device(loaded, device)


def to_device(value: Any, device: torch.device) -> Any:
    """A call's arguments with every tensor (in lists, tuples and dicts too) on `device`."""
    if device.type == CPU:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=False)
    if isinstance(value, list):
        return [to_device(item, device) for item in value]
    if isinstance(value, tuple):
        return tuple(to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value
