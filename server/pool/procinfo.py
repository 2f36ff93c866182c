"""What /proc says about processes (Linux): their memory, their children, whether they live."""

from __future__ import annotations

import os
from typing import NamedTuple


class MemoryUsage(NamedTuple):
    rss_bytes: int
    pss_bytes: int  # proportional: shared pages divided among the processes that map them
    shared_bytes: int  # resident pages also mapped by another process (e.g. shared weights)
    private_bytes: int  # resident pages only this process maps


def memory_usage(pid: int) -> MemoryUsage:
    """The process's memory; zeros if it is gone or /proc cannot say."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[name] = int(parts[0]) * 1024
    except OSError:
        return MemoryUsage(0, 0, 0, 0)
    return MemoryUsage(
        fields.get("Rss", 0),
        fields.get("Pss", 0),
        fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0),
        fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
    )


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def anonymous_resident_bytes(pid: int) -> int:
    """Resident anonymous memory (the kernel's RssAnon: heap, tensors, copied-on-write pages),
    from /proc/PID/statm, a read of microseconds; 0 if the process is gone.

    Pages of files and shared memory (weights, arenas) are not counted, but anonymous
    pages inherited from the fork server are (about 150 MB with torch imported).
    """
    try:
        with open(f"/proc/{pid}/statm") as statm:
            fields = statm.read().split()
    except OSError:
        return 0
    return (int(fields[1]) - int(fields[2])) * _PAGE_BYTES


def descendants_of(pid: int) -> set[int]:
    """Every live process below pid (for the daemon: the fork server, workers, helpers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """True while the process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
