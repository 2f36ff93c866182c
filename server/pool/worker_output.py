"""The daemon's end of a worker's output pipe: each line the worker writes to its fds 1 and 2
(server.worker.output) is logged at INFO, tagged with the worker's slot, its pid and the call
it was running. The pipe is read on the event loop as soon as anything is in it, so a worker
that prints never waits for a reader; what the log cannot take is dropped here, and counted.

    worker fd 1, 2 ──pipe (PIPE_BYTES)──> loop.add_reader ──> OutputReader._on_readable
        up to READ_BYTES a turn ──> lines (one over MAX_LINE_BYTES is cut, and says so)
            within the budget (BURST_LINES, refilled at LINES_PER_SECOND) ──> log.info
                "worker 1 (pid 1234, Invoke seed:2.forward) | the line"
            past it ──> dropped and counted (on_dropped: the daemon's metric); a warning says
                        how many lines and bytes went, at most once a second
        EOF, or the worker's exit (drain_and_close) ──> the last partial line; closed

The budget is per worker and bounds the daemon's own work: a model printing in a loop costs
the event loop a read and a count per READ_BYTES, not a log record per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable
from typing import NamedTuple

log = logging.getLogger(__name__)

# The pipe's buffer: a burst this large is taken without the worker waiting for the loop.
PIPE_BYTES = 2**20
READ_BYTES = 2**18  # one read
_READS_PER_TURN = 4  # then other callbacks get the loop
MAX_LINE_BYTES = 16 * 2**10  # longer lines are cut here
# Lines from one worker that are logged: a burst, then a steady rate. Half the log's queue
# (server.logs.MAX_QUEUED_RECORDS), so that one worker's flood leaves room for the daemon's own lines.
BURST_LINES = 500
LINES_PER_SECOND = 500.0
_REPORT_SECONDS = 1.0  # drops are summed up for at most this long before a warning says so


class RunningCall(NamedTuple):
    """What a worker was running when it wrote a line: the call in words, and its object."""

    call: str  # "Invoke obj-1f2e.forward (model seed v2)", "idle", "starting"
    object_id: str = ""


def open_pipe() -> tuple[int, int]:
    """A worker's output pipe: (read end for the daemon, non-blocking; write end for the worker)."""
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # over /proc/sys/fs/pipe-max-size: the default (64 KiB) will do
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    os.set_blocking(read_end, False)
    return read_end, write_end


class OutputReader:
    def __init__(
        self,
        fd: int,
        slot: int,
        pid: int,
        on_dropped: Callable[[int], None] = lambda size: None,
    ) -> None:
        """fd: the pipe's read end (taken: closed at EOF or close()); on_dropped(bytes) for the metric."""
        self.slot = slot
        self.pid = pid
        # What the worker runs now; the handle sets it (see WorkerHandle.running_call).
        self.running: Callable[[], RunningCall] = lambda: RunningCall("starting")
        self._fd = fd
        self._on_dropped = on_dropped
        self._loop = asyncio.get_running_loop()
        self._partial = bytearray()  # the line being read, up to MAX_LINE_BYTES
        self._cut = 0  # bytes of it past MAX_LINE_BYTES, thrown away
        self._tokens = float(BURST_LINES)
        self._refilled_at = time.monotonic()
        self._dropped_lines = 0  # since the last warning
        self._dropped_bytes = 0
        self._report: asyncio.TimerHandle | None = None
        self.closed = asyncio.Event()
        self._loop.add_reader(fd, self._on_readable)

    def drain_and_close(self) -> None:
        """Log what is left in the pipe, then close it: once the worker has exited, all it wrote
        is there (a child it forked may write on, unread). At most a pipe's worth, without waiting."""
        if not self.closed.is_set():
            self._on_readable(reads=PIPE_BYTES // READ_BYTES + 1)
        self.close()

    def close(self) -> None:
        if self.closed.is_set():
            return
        if self._partial or self._cut:
            self._line(b"")
        self._report_drops()
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self.closed.set()

    # ------------------------------------------------------------------ reading

    def _on_readable(self, reads: int = _READS_PER_TURN) -> None:
        for _ in range(reads):
            try:
                chunk = os.read(self._fd, READ_BYTES)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return
            self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        now = time.monotonic()
        self._tokens = min(BURST_LINES, self._tokens + (now - self._refilled_at) * LINES_PER_SECOND)
        self._refilled_at = now
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if self._tokens < 1:  # every other whole line of the chunk goes, counted, not split
                last = chunk.rindex(b"\n")
                self._drop(chunk.count(b"\n", start, last + 1), last + 1 - start + len(self._partial) + self._cut)
                self._partial.clear()
                self._cut = 0
                start = last + 1
                break
            self._tokens -= 1
            self._line(chunk[start:end])
            start = end + 1
        self._hold(chunk[start:])

    def _hold(self, piece: bytes) -> None:
        room = MAX_LINE_BYTES - len(self._partial)
        self._partial += piece[:room]
        self._cut += max(0, len(piece) - room)

    def _line(self, piece: bytes) -> None:
        self._hold(piece)
        text = self._partial.decode("utf-8", "replace").rstrip("\r")
        if self._cut:
            text += f" [cut: {self._cut} more bytes]"
        self._partial.clear()
        self._cut = 0
        running = self.running()
        fields = {"worker": self.slot, "pid": self.pid, "call": running.call}
        if running.object_id:
            fields["model"] = running.object_id
        tag = f"worker {self.slot} (pid {self.pid}, {running.call})"
        log.info("%s", text, extra={"tag": tag, "fields": fields})

    # ------------------------------------------------------------------ drops

    def _drop(self, lines: int, size: int) -> None:
        self._dropped_lines += lines
        self._dropped_bytes += size
        self._on_dropped(size)
        if self._report is None:
            self._report = self._loop.call_later(_REPORT_SECONDS, self._report_drops)

    def _report_drops(self) -> None:
        if self._report is not None:
            self._report.cancel()
            self._report = None
        if not self._dropped_lines:
            return
        log.warning(
            "worker %d (pid %d) printed more than the log takes (%d lines, then %g a second):"
            " %d lines (%d bytes) of its output were dropped",
            self.slot,
            self.pid,
            BURST_LINES,
            LINES_PER_SECOND,
            self._dropped_lines,
            self._dropped_bytes,
            extra={"fields": {"worker": self.slot, "pid": self.pid, "dropped_lines": self._dropped_lines}},
        )
        self._dropped_lines = self._dropped_bytes = 0
