"""The call board: where workers that serve calls themselves (data ports) tell the daemon
what they are running, without a message per call.

    worker slot i (writes its own row)          daemon (reads every row, ~10 times a second)
    begin(deadline, id): started += 1, since = now -> calls in flight = started - finished
    end():           finished += 1, since = 0    -> since != 0 for over max_call_seconds: kill
                                                 -> past the caller's deadline + grace: kill
                                                 -> a worker that died: which call it ran

One small shared-memory segment the daemon creates (server.ipc.shm.Segment) and names to
every worker; a worker maps it and writes only its own row. Each field is an aligned 8-byte
integer written by one process and read by another: on the machines we run on an aligned
store is seen whole, and a reader that catches a row between two stores sees a call that
began or ended a moment later, never a torn value. No lock, no system call per call.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import NamedTuple

# started, finished, running since (monotonic ns, 0: idle), caller's deadline (ns, 0: none),
# the running call's id (its caller's "deployd-call-id", 0: none), its label's length; then the
# label: what the call runs ("Invoke", object id, method), for the log of a hung call and for
# the lines the model prints (the daemon path knows these from its own requests).
_FIELDS = 6
_WORDS_BYTES = _FIELDS * 8
LABEL_BYTES = 80
ROW_BYTES = _WORDS_BYTES + LABEL_BYTES
_STARTED, _FINISHED, _SINCE, _DEADLINE, _CALL_ID, _LABEL_LENGTH = range(_FIELDS)
LABEL_SEPARATOR = "\x1f"  # between the label's parts: no object id or Python name holds it


def board_bytes(slots: int) -> int:
    return max(slots, 1) * ROW_BYTES


class Row(NamedTuple):
    """One worker's calls, as the daemon reads them."""

    started: int
    finished: int
    running_since_ns: int  # 0 while no call runs
    deadline_ns: int  # the running call's caller's deadline; 0: none or idle
    call_id: int  # the running call's id, as its caller gave it; 0: none or idle

    @property
    def in_flight(self) -> int:
        return max(self.started - self.finished, 0)


def read_row(board: memoryview, slot: int) -> Row:
    """A slot's row, from the daemon's mapping of the board."""
    words = board[slot * ROW_BYTES : slot * ROW_BYTES + _WORDS_BYTES].cast("q")
    return Row(words[_STARTED], words[_FINISHED], words[_SINCE], words[_DEADLINE], words[_CALL_ID])


def read_label(board: memoryview, slot: int) -> tuple[str, ...]:
    """The parts of the label of the call a slot runs (kind, object id, member); () when idle,
    or when the worker moved to another call while it was read."""
    base = slot * ROW_BYTES
    words = board[base : base + _WORDS_BYTES].cast("q")
    started = words[_STARTED]
    length = min(max(words[_LABEL_LENGTH], 0), LABEL_BYTES)
    text = bytes(board[base + _WORDS_BYTES : base + _WORDS_BYTES + length])
    if not words[_SINCE] or words[_STARTED] != started:
        return ()
    return tuple(text.decode("utf-8", "replace").split(LABEL_SEPARATOR))


def clear_row(board: memoryview, slot: int) -> None:
    """A new worker in the slot starts from nothing (its predecessor may have died mid-call)."""
    board[slot * ROW_BYTES : (slot + 1) * ROW_BYTES] = bytes(ROW_BYTES)


class WorkerRow:
    """A worker's own row, mapped by the segment's name."""

    def __init__(self, segment_name: str, slot: int, directory: str = "/dev/shm") -> None:
        descriptor = os.open(os.path.join(directory, segment_name), os.O_RDWR)
        try:
            self._mapping = mmap.mmap(descriptor, 0)
        finally:
            os.close(descriptor)
        row = memoryview(self._mapping)[slot * ROW_BYTES : (slot + 1) * ROW_BYTES]
        self._words = row[:_WORDS_BYTES].cast("q")
        self._label = row[_WORDS_BYTES:]

    def begin(self, deadline_ns: int = 0, call_id: int = 0, label: bytes = b"") -> None:
        """label: from call_label (at most LABEL_BYTES)."""
        words = self._words
        words[_DEADLINE] = deadline_ns
        words[_CALL_ID] = call_id
        self._label[: len(label)] = label
        words[_LABEL_LENGTH] = len(label)
        words[_SINCE] = time.monotonic_ns()
        words[_STARTED] += 1

    def end(self) -> None:
        words = self._words
        words[_SINCE] = 0
        words[_DEADLINE] = 0
        words[_CALL_ID] = 0
        words[_FINISHED] += 1


def call_label(kind: str, object_id: str, member: str) -> bytes:
    """A call's label for its row, cut to fit (the worker caches it per call site)."""
    return LABEL_SEPARATOR.join((kind, object_id, member)).encode()[:LABEL_BYTES]
