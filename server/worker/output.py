"""Where a worker's output goes: its fds 1 and 2 become the write end of its output pipe, which
the daemon reads and logs line by line, each line tagged with the worker's slot, pid and the
call it was running (server.pool.worker_output).

    print(), sys.stderr, C's printf, warnings, tracebacks ──> fd 1, fd 2 ──pipe──> the daemon
    faulthandler's stack dumps, a data port's log lines ──> the daemon's stderr, kept as its own fd

The pipe is the daemon's (1 MiB, read as soon as anything is in it): a model that prints waits
only while the daemon's event loop cannot run at all, and what the daemon cannot keep up with
it drops and counts, on its side. Stack dumps and log lines are not model output: they keep
the direct way they always had, so that a flood the daemon drops cannot take them with it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_daemon_stderr = 2  # fd 2 until redirect_output keeps it elsewhere


def redirect_output(output: Any) -> None:
    """Point fds 1 and 2 at output (the pipe's write end, a multiprocessing Connection; None:
    leave them as inherited), keeping the daemon's stderr for daemon_stderr()."""
    global _daemon_stderr
    if output is None:
        return
    _daemon_stderr = os.dup(2)
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    output.close()
    for stream in (sys.stdout, sys.stderr):
        # A pipe makes Python buffer whole blocks: a line printed would reach the log only
        # when the block fills or the worker exits.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)


def daemon_stderr() -> int:
    """The daemon's own stderr (not the output pipe), for what must reach its log undropped."""
    return _daemon_stderr
