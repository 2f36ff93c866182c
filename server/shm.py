"""Shared memory that the daemon owns: it creates every segment, and unlinks every one.

Segments are named `deployd-<daemon pid>-<n>`, so a daemon that starts can tell the
segments of a daemon that died (SIGKILL leaves them behind) from those of one alive.
Workers map segments by name (server.worker.shared); they never create or unlink one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

log = logging.getLogger(__name__)

SHM_DIRECTORY = "/dev/shm"
PREFIX = "deployd-"
ALIGNMENT = 64  # every tensor starts on a cache line: aligned for every dtype
_NAME = re.compile(rf"^{PREFIX}(\d+)-\d+$")
_counter = itertools.count()


def align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class Segment:
    """One shared-memory segment, mapped read-write in the daemon until closed."""

    def __init__(self, size: int) -> None:
        self.name = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.size = max(size, 1)
        self._memory: SharedMemory | None = SharedMemory(self.name, create=True, size=self.size)
        # The daemon unlinks its own segments; the multiprocessing tracker need not
        # (and would warn at exit about segments that were already gone).
        resource_tracker.unregister(self._memory._name, "shared_memory")  # type: ignore[attr-defined]

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
