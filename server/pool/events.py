"""What the supervisor tells the rest of the daemon about its workers: one stream of events.

    Supervisor ──WorkerServing(worker)──────────────> listeners, in the order they subscribed:
               ──WorkerExited(worker, reason, ...)──>   the dispatcher (routes calls), sessions,
                                                        the daemon (metrics, health)

A listener is a plain function that takes an event and returns at once (it may start a task):
the supervisor calls every listener in turn, in the order events happen, before it goes on.
So when the supervisor emits WorkerServing while it holds `changes`, every listener has seen
the worker before a change that broadcasts under `changes` can run, and after WorkerExited
no listener will hand the dead worker anything. A listener that raises is logged and skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from server.pool.worker_handle import WorkerHandle


@dataclass(frozen=True, slots=True)
class WorkerServing:
    """A worker was prepared (everything loaded replayed into it) and takes calls from now on.

    Emitted while the supervisor holds `changes`; the worker's state is idle."""

    worker: WorkerHandle


@dataclass(frozen=True, slots=True)
class WorkerExited:
    """A worker's process ended, whether or not it had served: its requests in flight have
    already failed with WorkerCrashed."""

    worker: WorkerHandle
    reason: str  # how it ended, in words: "was killed by signal SIGKILL", "was stopped (...)"
    cause: str  # the same in one word, for metrics: exited, crashed, killed, memory_limit, stopped, ...
    # The supervisor ended it on purpose (stop, a replay that failed) or is stopping: no
    # restart follows for this death. False: it died or was killed, and is being replaced.
    stopped: bool


WorkerEvent = WorkerServing | WorkerExited
WorkerListener = Callable[[WorkerEvent], None]
