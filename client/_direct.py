"""The direct path: a model's calls go straight to a worker's data port, not through the daemon.

    manager ──Endpoints (once, and again when told)──> daemon: each worker's host:port
    obj(x) ──> Routes.pick(): the worker with the fewest calls in flight (torch::deploy's
               LoadBalancer) ──Invoke/HasAttr──> that worker's own gRPC server
           <── its answer, whose trailing metadata carries the daemon's endpoints generation:
               newer than ours, or a worker gone (UNAVAILABLE) ──> ask Endpoints again

A worker that cannot be reached is skipped and the call tried on another; if no worker was
ever reached (a container that publishes only the daemon's port, a firewall), the manager
warns once and keeps to the daemon path. direct=False, or DEPLOYD_DIRECT=0, keeps to it from
the start; so does a target of several replicas (client._replicas): an ipv4: list at once, a
dns: name that resolves to several addresses when the manager first asks for Endpoints.

No I/O here: the managers (client/aio/_manager.py and its generated twin) call and wait.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

import grpc

from client._errors import UnavailableError
from client._replicas import replicas_listed

DIRECT_ENV = "DEPLOYD_DIRECT"
_TARGETS_MAX_AGE = 1.0  # seconds
GENERATION_KEY = "deployd-endpoints-generation"
# Each call on a data port is named, so that if its worker dies the daemon can say whether this
# call was the one running (Endpoints' exits): such a call is not tried again (it would end
# another worker), as on the daemon path.
CALL_ID_KEY = "deployd-call-id"
_OFF = frozenset({"0", "false", "no", "off"})
# A call whose caller gave up (its deadline passed) still runs in its worker, which serves one
# call at a time: the worker counts as busy until it answers another call or this long has
# passed (the daemon's pool.abandoned_call_grace_seconds, by default: by then the daemon has
# replaced a worker still running it).
ABANDONED_BUSY_SECONDS = 5.0


def direct_wanted(direct: bool | None, target: str) -> bool:
    """Whether a manager tries the direct path: direct=None follows $DEPLOYD_DIRECT (on unless 0)."""
    if direct is None:
        direct = os.environ.get(DIRECT_ENV, "1").strip().lower() not in _OFF
    return direct and replicas_listed(target) <= 1


def never_reached(details: str | None) -> bool:
    """Whether an UNAVAILABLE call never reached the worker (its port refused the connection):
    trying it on another worker is safe whatever the retry policy."""
    text = (details or "").lower()
    return "failed to connect" in text or "connection refused" in text


def generation_in(trailers: Any) -> int:
    for key, value in trailers or ():
        if key == GENERATION_KEY:
            try:
                return int(value)
            except ValueError:
                return -1
    return -1


def lost_worker_error(gone: Any, call_id: int) -> UnavailableError:
    """What a call that lost its worker fails with, in the daemon path's words (server.pool's
    WorkerCrashed): the call it ran, or one that waited behind it (which may be tried again)."""
    worker = f"worker {gone.slot} (pid {gone.pid}) {gone.reason}"
    if call_id and gone.call_id == call_id:
        return UnavailableError(
            grpc.StatusCode.UNAVAILABLE, f"{worker} while serving this call", call_killed_worker=gone.call_killed_worker
        )
    return UnavailableError(
        grpc.StatusCode.UNAVAILABLE, f"{worker} while running an earlier request, before it could start this one"
    )


def new_call_id() -> int:
    return secrets.randbits(63) or 1


class Worker:
    """One data port, as a manager calls it."""

    def __init__(self, address: str, pid: int, channel: Any, stub: Any) -> None:
        self.address = address
        self.pid = pid
        self.channel = channel
        self.stub = stub
        self.in_flight = 0
        self.targets: set[str] = set()  # what the daemon says to call here (Endpoints' models)
        self.abandoned_until = 0.0  # a call given up on may still run there until then

    def load(self) -> int:
        """Calls in flight here, counting one a caller gave up on that may still be running."""
        if self.abandoned_until and time.monotonic() < self.abandoned_until:
            return self.in_flight + 1
        return self.in_flight

    def note_answer(self) -> None:
        """The worker answered: whatever was given up on there has finished."""
        self.abandoned_until = 0.0

    def note_abandoned(self) -> None:
        self.abandoned_until = time.monotonic() + ABANDONED_BUSY_SECONDS


class Routes:
    """The data ports a manager knows, and which one takes the next call."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.workers: list[Worker] = []
        self.generation = -1
        self.stale = enabled  # ask Endpoints before the next call
        self.reached = False  # a worker has answered once: the ports are reachable from here
        # What the daemon says to call on the ports (not models that batch: their batches form
        # in the daemon's one line), and when it last said so.
        self.targets: set[str] = set()
        self.refreshed_at = 0.0
        self._turn = 0

    def check_target(self, target: str) -> None:
        """A call for something the list does not name goes through the daemon; if the list is
        over a second old, it is asked for again first (the name may be new)."""
        if self.enabled and target not in self.targets and time.monotonic() - self.refreshed_at > _TARGETS_MAX_AGE:
            self.stale = True

    def pick(self, skip: set[str], target: str) -> Worker | None:
        """Of the workers that hold target, the one with the fewest calls in flight (ties taken
        in turn); None: the daemon's path."""
        if not self.enabled:
            return None
        candidates = [worker for worker in self.workers if worker.address not in skip and target in worker.targets]
        if not candidates:
            return None
        self._turn += 1
        start = self._turn % len(candidates)
        ordered = candidates[start:] + candidates[:start]
        return min(ordered, key=Worker.load)

    def note_generation(self, generation: int) -> None:
        if generation > self.generation:
            self.stale = True
