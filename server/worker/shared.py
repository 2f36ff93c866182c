"""Shared memory in a worker: tensor arenas and package weights, both owned by the daemon.

ArenaMappings maps the daemon's arenas (server.ipc.shm.Arena) by name: request tensors are
wrapped where they lie, reply tensors are copied in once. SharedWeightsReader stands
in for a PackageImporter's zip reader: asked for a storage record, it returns a tensor
over a copy-on-write mapping of the package's weight segment (server.models.weights) instead
of reading the archive. A worker never creates or unlinks a segment.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import torch

from server.ipc.protocol import align

SHM_DIRECTORY = "/dev/shm"


def map_shared(name: str) -> mmap.mmap:
    """Map a whole daemon-owned segment read-write, shared with the daemon."""
    descriptor = os.open(os.path.join(SHM_DIRECTORY, name), os.O_RDWR)
    try:
        return mmap.mmap(descriptor, 0)
    finally:
        os.close(descriptor)


class ArenaMappings:
    """The daemon's arenas, mapped by name as frames name them."""

    _KEEP = 4  # the current inbox and outbox, and the ones they just replaced

    def __init__(self) -> None:
        self._mappings: dict[str, memoryview] = {}

    def view(self, ref: tuple[str, int, int]) -> memoryview:
        """The bytes a frame refers to, where they lie (no copy)."""
        name, start, size = ref
        return self._mapping(name)[start : start + size]

    def _mapping(self, name: str) -> memoryview:
        mapping = self._mappings.get(name)
        if mapping is None:
            if len(self._mappings) >= self._KEEP:
                # Forget the oldest: tensors still using it keep it mapped until they die.
                del self._mappings[next(iter(self._mappings))]
            mapping = self._mappings[name] = memoryview(map_shared(name))
        return mapping


class ReplyPlacement:
    """Copies a reply's large buffers into the arena the daemon lent for it (protocol.Placement)."""

    def __init__(self, mappings: ArenaMappings, arena: tuple[str, int] | None, threshold: int) -> None:
        self._mappings = mappings
        self._arena = arena
        self._threshold = threshold
        self._offset = 0
        self.bytes_wanted = 0  # what the reply's large buffers needed in all

    def place(self, parts: list[memoryview]) -> tuple[str, int, int] | None:
        if len(parts) != 1:  # a worker's replies are never gathered
            return None
        (view,) = parts
        size = view.nbytes
        if size < self._threshold:
            return None
        start = align(self._offset)
        self.bytes_wanted = align(self.bytes_wanted) + size
        if self._arena is None or start + size > self._arena[1]:
            return None
        name = self._arena[0]
        self._mappings.view((name, start, size))[:] = view
        self._offset = start + size
        return (name, start, size)


def map_private(name: str, size: int) -> mmap.mmap:
    """Map a daemon-owned segment copy-on-write: reads share its pages, writes stay here."""
    descriptor = os.open(os.path.join(SHM_DIRECTORY, name), os.O_RDONLY)
    try:
        return mmap.mmap(descriptor, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(descriptor)


class SharedWeightsReader:
    def __init__(self, reader: Any, segment: str, size: int, index: dict[str, Any]) -> None:
        self._reader = reader
        self._segment = segment
        self._size = size
        self._index = index
        self._mapping: mmap.mmap | None = None

    def new_mapping(self) -> None:
        """Start a fresh copy-on-write mapping: the next object unpickled gets its own weights,
        as torch.package gives each load_pickle call its own storages."""
        self._mapping = map_private(self._segment, self._size)

    def close(self) -> None:
        """Drop this reader's mapping (the package is closed): its pages go with the last
        tensor still using them, even if something keeps the importer alive."""
        self._mapping = None

    def get_storage_from_record(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        entry = self._index.get(name)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if entry is None or entry[1] != numel * itemsize:
            return self._reader.get_storage_from_record(name, numel, dtype)  # type: ignore[no-any-return]
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        if self._mapping is None:
            self.new_mapping()
        return torch.frombuffer(self._mapping, dtype=dtype, count=numel, offset=entry[0])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)
