"""glibc malloc settings for large buffers, in the daemon and (through the environment) its workers.

By default glibc serves blocks over 128 KiB (adaptively up to 32 MiB) with fresh mmaps and
trims the heap on free, so every request buffer, result and protobuf arena of that size
page-faults afresh. On this kind of machine first touch runs at ~2-3 GB/s against ~10-16
GB/s for memory already in use, and tuning makes 1-16 MiB gRPC payloads about twice as
fast (../shared/limits/README.md, section 0). The cost: freed memory stays with the process.

So the daemon keeps one malloc arena (M_ARENA_MAX=1) instead of one per thread. By default
each thread that allocates (grpc's event-engine threads, the executor's threads) gets an
arena of its own, and with the trim threshold above, each arena keeps the largest amount
its thread ever held: a process's retained heap is the sum of those highs, and it grows
as more threads happen to carry a large message (a daemon that loaded, called and
unloaded a 16 MB package 150 times grew from 71 to 96 MB with one arena per thread, and
stayed at 69-70 MB with one shared arena: bench.churn). Workers, which run torch's own
threads, keep glibc's default. Unloading a package trims the heap (release_free_memory).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

# The environment names glibc reads at process start, and their mallopt() parameters.
SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": (-3, 32 * 1024 * 1024),  # M_MMAP_THRESHOLD: the largest glibc allows
    "MALLOC_TRIM_THRESHOLD_": (-1, 1024 * 1024 * 1024),  # M_TRIM_THRESHOLD
}
# For the daemon only (not exported to workers): M_ARENA_MAX, unless the environment sets it.
_ARENA_MAX = ("MALLOC_ARENA_MAX", -8, 1)


def tune_malloc() -> bool:
    """Apply the settings here (mallopt) and export them to child processes; values an operator
    already set in the environment win. False if this is not glibc."""
    for name, (_, default) in SETTINGS.items():
        os.environ.setdefault(name, str(default))  # the fork server reads them when it starts
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    for name, (parameter, _) in SETTINGS.items():
        if not mallopt(parameter, int(os.environ[name])):
            log.warning("mallopt refused %s=%s", name, os.environ[name])
            return False
    name, parameter, value = _ARENA_MAX
    if name not in os.environ and not mallopt(parameter, value):  # glibc read the variable itself
        log.warning("mallopt refused %s=%s", name, value)
        return False
    return True


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim), e.g. once a package
    is unloaded: with the settings above nothing else would, and the holes that large buffers
    leave between long-lived small objects would stay resident. A no-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, looked up once (each lookup leaves a function pointer behind); None without glibc."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
