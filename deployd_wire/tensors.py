"""Torch tensors <-> their bytes on the wire (little-endian, C order), for workers and the client."""

from __future__ import annotations

from typing import Any

import torch

from deployd_wire.dtypes import DTYPES

TORCH_DTYPES: dict[str, torch.dtype] = {dtype.name: getattr(torch, dtype.name) for dtype in DTYPES}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as little-endian C-order bytes: a view when already dense, else one copy."""
    try:
        # The common case in one step: a dense CPU tensor numpy can see (not bfloat16, no
        # conj or neg bit, no grad); the cast fails for anything not C-contiguous.
        return memoryview(tensor.numpy()).cast("B")  # type: ignore[arg-type]
    except (TypeError, RuntimeError):
        pass
    dense = tensor.detach()
    if dense.layout != torch.strided:
        dense = dense.to_dense()
    # Any layout (transposed, sliced, conjugated views) goes as dense C-order bytes.
    flat = dense.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    if flat.stride(0) != 1:  # one element counts as contiguous whatever its stride; view() needs 1
        flat = flat.clone(memory_format=torch.contiguous_format)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def tensor_from_buffer(buffer: Any, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor over buffer's memory, without a copy (the caller decides who may write to it)."""
    if len(buffer) == 0:  # frombuffer refuses empty buffers
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(buffer, dtype=dtype)
    return flat if len(shape) == 1 else flat.reshape(shape)
