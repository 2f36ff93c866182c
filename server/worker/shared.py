"""Package weights from a shared segment, in a worker (see server.weights for the whole story).

SharedWeightsReader stands in for a PackageImporter's zip reader: asked for a storage
record, it returns a tensor over a copy-on-write mapping of the daemon's segment
instead of reading the archive. Every other request goes to the real reader.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import torch

SHM_DIRECTORY = "/dev/shm"


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
