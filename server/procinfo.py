"""What a process's memory is made of, from /proc/PID/smaps_rollup (Linux)."""

from __future__ import annotations

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
