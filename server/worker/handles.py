"""A tensor shared by its handle: what a keeper (server.worker.keeper) gives, what a worker
rebuilds into a tensor over the keeper's memory, with no copy.

    keeper: share(tensor) ──> a handle (builtins only: it crosses as marshal, via the daemon)
    worker: rebuild(handle) ──> a tensor on the same memory (CUDA IPC; on the CPU, shared memory)

On a GPU the handle is torch.multiprocessing's CUDA IPC reduction (storage._share_cuda_(),
rebuilt as torch.multiprocessing.reductions.rebuild_cuda_tensor does); on the CPU, its
file_system reduction (storage._share_filename_cpu_(): a named segment that torch's shm manager
unlinks with its last user). The memory lives while the keeper holds the tensor: a worker that
dies takes only its mapping with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

Handle = tuple[Any, ...]


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"no torch dtype {name!r}")
    return dtype


def share(tensor: torch.Tensor) -> Handle:
    """The handle of a tensor, its storage moved to shared memory first if on the CPU."""
    tensor = tensor.detach() if not isinstance(tensor, torch.nn.Parameter) else tensor
    layout = (
        isinstance(tensor, torch.nn.Parameter),
        list(tensor.size()),
        list(tensor.stride()),
        tensor.storage_offset(),
        str(tensor.dtype),
        tensor.requires_grad,
    )
    if tensor.device.type == "cuda":
        storage = tensor._typed_storage()
        device, handle, size, offset, counter, counter_offset, event, sync = storage._share_cuda_()
        return ("cuda", *layout, device, handle, size, offset, counter, counter_offset, event, sync)
    if tensor.device.type != "cpu":
        raise ValueError(f"a tensor on {tensor.device} cannot be shared")
    manager, handle, size = tensor.untyped_storage()._share_filename_cpu_()
    return ("cpu", *layout, manager, handle, size)


def rebuild(handle: Handle) -> torch.Tensor:
    """The tensor a handle stands for, over the sharer's memory."""
    kind, is_parameter, size, stride, offset, dtype_name, requires_grad, *where = handle
    dtype = _dtype(dtype_name)
    tensor_type = torch.nn.Parameter if is_parameter else torch.Tensor
    if kind == "cuda":
        device, storage_handle, storage_size, storage_offset, counter, counter_offset, event, sync = where
        return rebuild_cuda_tensor(  # type: ignore[no-any-return]
            tensor_type,
            torch.Size(size),
            tuple(stride),
            offset,
            torch.storage.TypedStorage,
            dtype,
            device,
            storage_handle,
            storage_size,
            storage_offset,
            requires_grad,
            counter,
            counter_offset,
            event,
            sync,
        )
    if kind != "cpu":
        raise ValueError(f"unknown handle kind {kind!r}")
    manager, storage_handle, storage_size = where
    storage = torch.UntypedStorage._new_shared_filename_cpu(manager, storage_handle, storage_size)
    tensor = torch.empty(0, dtype=dtype).set_(storage, offset, size, stride)
    if is_parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor


def share_state(model: Any) -> dict[str, Handle]:
    """Every parameter and persistent buffer of a Module, by its state_dict name, as handles."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"a keeper shares the weights of a torch.nn.Module, not of a {type(model).__qualname__}")
    return {name: share(tensor) for name, tensor in model.state_dict(keep_vars=True).items()}


def adopt_state(model: Any, handles: dict[str, Handle]) -> None:
    """Put the shared tensors in place of a Module's own (its freshly unpickled copies)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"shared weights are for a torch.nn.Module, not a {type(model).__qualname__}")
    state = {name: rebuild(handle) for name, handle in handles.items()}
    model.load_state_dict(state, strict=True, assign=True)
