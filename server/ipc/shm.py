"""Shared memory that the daemon owns: it creates every segment, and unlinks every one.

Segments are named `deployd-<daemon pid>-<n>`, so a daemon that starts can tell the
segments of a daemon that died (SIGKILL leaves them behind) from those of one alive.
Workers map segments by name (server.worker.shared); they never create or unlink one.
When workers run as another user (worker.user), segments are shared with that user's
group (set_worker_group): mode 0660, instead of 0600.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from server.ipc.protocol import align, buffer_parts

log = logging.getLogger(__name__)

SHM_DIRECTORY = "/dev/shm"
PREFIX = "deployd-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-\d+$")
_counter = itertools.count()
_worker_group: int | None = None


def set_worker_group(gid: int | None) -> None:
    """Segments made from now on may be mapped (read-write) by this group too; None: owner only."""
    global _worker_group
    _worker_group = gid


class SharedMemoryFull(OSError):
    """/dev/shm has no room for a segment (in a container: raise --shm-size)."""


class Segment:
    """One shared-memory segment, mapped read-write in the daemon until closed.

    Its pages are reserved when it is made, so a full /dev/shm fails here with
    SharedMemoryFull instead of killing whoever touches the page later with SIGBUS.
    """

    def __init__(self, size: int) -> None:
        self.name = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.size = max(size, 1)
        self._memory: SharedMemory | None = SharedMemory(self.name, create=True, size=self.size)
        # The daemon unlinks its own segments; the multiprocessing tracker need not
        # (and would warn at exit about segments that were already gone).
        resource_tracker.unregister(self._memory._name, "shared_memory")  # type: ignore[attr-defined]
        if _worker_group is not None:
            os.fchown(self._memory._fd, -1, _worker_group)  # type: ignore[attr-defined]
            os.fchmod(self._memory._fd, 0o660)  # type: ignore[attr-defined]
        try:
            os.posix_fallocate(self._memory._fd, 0, self.size)  # type: ignore[attr-defined]
        except OSError as error:
            self.unlink()
            raise SharedMemoryFull(error.errno, f"cannot reserve {self.size} bytes in {SHM_DIRECTORY}") from None

    @property
    def buffer(self) -> memoryview:
        assert self._memory is not None, "segment is closed"
        return self._memory.buf  # type: ignore[return-value]

    def close(self) -> None:
        """Drop the daemon's mapping; the segment lives on for those who map it."""
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    def unlink(self) -> None:
        """Close and remove the name; pages are freed once no process maps them."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIRECTORY, self.name))


class Arena:
    """A segment reused for one worker's tensors in one direction; it grows on demand.

    The daemon writes a request's tensors into the worker's inbox arena, and lends the
    worker an outbox arena for the reply's. Reuse matters: on this kind of machine a
    page touched for the first time costs more than copying into it (README, limits).
    """

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold  # smaller buffers go inline: cheaper than the bookkeeping
        self.segment: Segment | None = None
        self._offset = 0

    def wanted(self, buffers: list[Any]) -> int:
        """Bytes the buffers large enough to travel here need, alignment included."""
        sizes = (sum(part.nbytes for part in buffer_parts(buffer)) for buffer in buffers)
        return sum(align(size) for size in sizes if size >= self.threshold)

    def reserve(self, size: int) -> bool:
        """Make room for size bytes from offset 0 (a new segment if too small); False if none."""
        self._offset = 0
        if size == 0 or (self.segment is not None and self.segment.size >= size):
            return self.segment is not None
        grown = max(_MIN_ARENA, 1 << (size - 1).bit_length())  # room to grow before the next resize
        self.retire()
        try:
            self.segment = Segment(grown)
        except SharedMemoryFull as error:
            log.warning("%s; tensors go through the socket instead", error)
            return False
        return True

    def place(self, parts: list[memoryview]) -> tuple[str, int, int] | None:
        """Copy a buffer (its parts, end to end) into the arena, if it is large enough to be
        worth it and fits."""
        size = sum(part.nbytes for part in parts)
        if size < self.threshold or self.segment is None:
            return None
        start = align(self._offset)
        if start + size > self.segment.size:
            return None
        offset = start
        for part in parts:
            self.segment.buffer[offset : offset + part.nbytes] = part
            offset += part.nbytes
        self._offset = offset
        return (self.segment.name, start, size)

    def read(self, ref: tuple[str, int, int]) -> bytes:
        """Copy a buffer out (the arena is reused by the next call)."""
        name, start, size = ref
        if self.segment is None or name != self.segment.name or start + size > self.segment.size:
            raise ValueError(f"reference {ref} is outside the arena")
        return bytes(self.segment.buffer[start : start + size])

    def retire(self) -> None:
        """Unlink the segment; a worker that still maps it keeps its pages until it lets go."""
        if self.segment is not None:
            self.segment.unlink()
            self.segment = None


_MIN_ARENA = 1 << 20


def remove_stale_segments() -> list[str]:
    """Unlink segments left by deployd daemons that are no longer running."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIRECTORY)
    except FileNotFoundError:
        return removed
    for name in names:
        match = _NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            try:
                os.unlink(os.path.join(SHM_DIRECTORY, name))
                removed.append(name)
            except OSError:
                pass
    if removed:
        log.warning("removed %d shared-memory segments left by a daemon that died", len(removed))
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
