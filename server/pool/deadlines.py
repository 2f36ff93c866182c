"""The deadline of the caller a task serves, from the edge that knows it to the worker.

The servicer sets it once per call (server.api.calls); a request sent to a worker on that
task carries it (WorkerHandle.send), and model code reads it (deployd_worker.deadline()). A
batch, run in a task of its own, carries its callers' latest (server.batching.batcher).
Monotonic nanoseconds: the clock every process of the machine shares. 0: no deadline.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterable

caller_deadline_ns: contextvars.ContextVar[int] = contextvars.ContextVar("caller_deadline_ns", default=0)


def deadline_in(seconds: float | None) -> int:
    """The deadline seconds from now (None: no deadline, 0)."""
    return 0 if seconds is None else time.monotonic_ns() + int(seconds * 1e9)


def latest(deadlines: Iterable[int]) -> int:
    """The deadline of work done for several callers: the last of theirs, none if one has none."""
    values = list(deadlines)
    return 0 if not values or 0 in values else max(values)
