"""Where a model runs: `device: cpu | cuda | cuda:N | auto` (a model entry's, LoadPickle's),
against the pool's GPUs (`pool.gpus`: which GPU each worker slot is bound to).

    device (asked for) ──> resolve_device(device, slot_gpus) ──> Resolved("cpu" | "cuda", the slots it may use)

Each worker bound to a GPU sees that one GPU only (CUDA_VISIBLE_DEVICES, set in the worker), as
its "cuda"; so a model on cuda:N goes to the workers bound to GPU N, and the worker is only told
"cuda". auto is cuda (any GPU of the pool) when the pool has GPUs, else cpu. This module never
touches CUDA, nor imports torch: the daemon must not start CUDA (a fork after it breaks CUDA in
the child). Imports no grpc.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from server.errors import InvalidArgument

CPU = "cpu"
AUTO = "auto"
_DEVICE = re.compile(r"^(cpu|auto|cuda(:(0|[1-9][0-9]{0,3}))?)$")


def parse_device(raw: Any) -> str:
    """A device as asked for ("cpu", "auto", "cuda", "cuda:N"); InvalidArgument for anything else."""
    if isinstance(raw, str) and _DEVICE.match(raw):
        return raw
    raise InvalidArgument(f"device must be cpu, cuda, cuda:N or auto, got {raw!r}")


class Resolved(NamedTuple):
    """kind: what the worker is told ("cpu" or "cuda"); slots: the worker slots the model may be
    placed on (None: any)."""

    kind: str
    slots: tuple[int, ...] | None


def gpu_slots(slot_gpus: tuple[int, ...], gpu: int | None = None) -> tuple[int, ...]:
    """The slots bound to a GPU (gpu None: to any GPU). slot_gpus[slot]: its GPU, -1 for none."""
    return tuple(slot for slot, bound in enumerate(slot_gpus) if bound >= 0 and (gpu is None or bound == gpu))


def resolve_device(device: str, slot_gpus: tuple[int, ...]) -> Resolved:
    """Where a model on `device` may run in a pool whose slots are bound as slot_gpus says;
    InvalidArgument if the pool has no such device."""
    device = parse_device(device)
    if device == CPU or (device == AUTO and not gpu_slots(slot_gpus)):
        return Resolved(CPU, None)
    if device in (AUTO, "cuda"):
        slots = gpu_slots(slot_gpus)
        if not slots:
            raise InvalidArgument(f"device {device}: the pool has no GPU workers (pool.gpus is empty)")
        return Resolved("cuda", slots)
    gpu = int(device.split(":")[1])
    slots = gpu_slots(slot_gpus, gpu)
    if not slots:
        have = sorted({bound for bound in slot_gpus if bound >= 0})
        listed = f"pool.gpus has {', '.join(f'cuda:{index}' for index in have)}" if have else "pool.gpus is empty"
        raise InvalidArgument(f"device {device}: the pool has no workers on that GPU ({listed})")
    return Resolved("cuda", slots)


def parse_gpus(raw: Any) -> tuple[tuple[int, int], ...]:
    """pool.gpus: a list of GPUs, each "N" (one worker on GPU N) or "N=W" (W workers on it);
    as (gpu, workers) pairs. ValueError says what is wrong."""
    pairs: list[tuple[int, int]] = []
    for item in raw:
        text = str(item).strip()
        gpu, equals, count = text.partition("=")
        if not gpu.isdigit() or (equals and not count.isdigit()):
            raise ValueError(f"{item!r} is not N or N=WORKERS (GPU N, WORKERS workers on it)")
        workers = int(count) if equals else 1
        if workers < 1:
            raise ValueError(f"{item!r}: a GPU takes at least 1 worker")
        if any(int(gpu) == seen for seen, _ in pairs):
            raise ValueError(f"GPU {gpu} is listed twice")
        pairs.append((int(gpu), workers))
    return tuple(pairs)


def bind_slots(gpus: tuple[tuple[int, int], ...], pool_size: int) -> tuple[int, ...]:
    """Each worker slot's GPU (-1: none): the GPUs' workers take the first slots, in order; the
    rest run on the CPU. () when the pool has no GPUs (workers keep the environment they inherit)."""
    if not gpus:
        return ()
    bound = [gpu for gpu, workers in gpus for _ in range(workers)]
    return (*bound, *([-1] * (pool_size - len(bound))))
