"""The call a worker runs now, as deployd_worker's functions see it.

The worker (server.worker.main on the daemon path, server.api.dataport on a data port) wraps
each request it runs in `running(Call(...))`. Model code runs one request at a time in a
worker, on one thread, so one module-level slot holds the running call; `running` puts back
the one before, so that a call made while another waits (a data port's event loop) leaves
the outer one in place.
"""

from __future__ import annotations

import time


class Cancelled(Exception):
    """Raised by check() once the running call's caller is gone; deadline_passed says why."""

    def __init__(self, deadline_passed: bool) -> None:
        why = "its deadline passed" if deadline_passed else "it cancelled the call"
        super().__init__(f"the caller is gone: {why}")
        self.deadline_passed = deadline_passed


class Call:
    """One running call: its deadline, and where the daemon flags that its caller gave up.

    deadline_ns: the caller's deadline on the monotonic clock (shared by every process of the
    machine), in nanoseconds; 0: none. flags: a shared-memory word the daemon writes the
    request id of a call whose caller gave up into (server.ipc.cancel_board), and key: this
    call's request id. Request ids are never reused in a daemon's life, so a flag written for
    an earlier call can never match this one.
    """

    __slots__ = ("_deadline_ns", "_flags", "_key", "deadline", "gone")

    def __init__(self, deadline_ns: int = 0, flags: memoryview | None = None, key: int = 0) -> None:
        self._deadline_ns = deadline_ns
        self._flags = flags
        self._key = key
        self.gone = False  # the caller is gone (sticky); a grpc done callback may set it too
        # The wall-clock time of the deadline, worked out once from the shared monotonic one.
        self.deadline = time.time() + (deadline_ns - time.monotonic_ns()) / 1e9 if deadline_ns else None

    def cancelled(self) -> bool:
        if not self.gone:
            flags = self._flags
            self.gone = (flags is not None and flags[0] == self._key) or self.deadline_passed()
        return self.gone

    def deadline_passed(self) -> bool:
        return bool(self._deadline_ns) and time.monotonic_ns() >= self._deadline_ns


_running: Call | None = None


class running:  # lower case: used as a function, `with running(call):`
    """Make call the running one for the block (the worker's side of this module). A class, not
    a generator: it wraps every call a worker runs, and costs a third as much."""

    __slots__ = ("_call", "_previous")

    def __init__(self, call: Call) -> None:
        self._call = call
        self._previous: Call | None = None

    def __enter__(self) -> Call:
        global _running
        self._previous, _running = _running, self._call
        return self._call

    def __exit__(self, *exc_info: object) -> None:
        global _running
        _running = self._previous


def cancelled() -> bool:
    """Whether the running call's caller is gone (deadline passed, or cancelled); False outside a call."""
    call = _running
    return call is not None and call.cancelled()


def deadline() -> float | None:
    """The running call's deadline (a time.time() timestamp); None without one, or outside a call."""
    call = _running
    return None if call is None else call.deadline


def check() -> None:
    """Raise Cancelled if the running call's caller is gone; nothing outside a call."""
    call = _running
    if call is not None and call.cancelled():
        raise Cancelled(call.deadline_passed())
