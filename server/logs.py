"""The daemon's logs: written by a thread of their own, in plain lines or one JSON object per
line (server.log_format).

A serving path never waits on its logs. A record is handed to a bounded queue on the
thread that logs it (the event loop, mostly); one writer thread formats and writes it
to stderr. When stderr stops taking lines (a full pipe nobody reads), the queue fills
and further records are dropped and counted (records_dropped(), served as
deployd_log_records_dropped_total), rather than stalling every call:

    logger.info() -> QueueingHandler.enqueue() --put_nowait--> queue (MAX_QUEUED_RECORDS)
                                       | full: dropped += 1        |
                                                       writer thread (QueueListener)
                                                       -> format -> os.write(stderr)

A record may carry structured fields (`extra={"fields": {...}}`, as the per-call line
does): plain appends them as key=value, JSON puts them at the top level.

A worker's fds 1 and 2 are a pipe the daemon reads (server.pool.worker_output): each line
a model prints is logged here, with a tag (`extra={"tag": "worker 1 (pid 7, ...)", "fields":
{...}}`) that plain writes before the line, as `tag | line`, in place of the fields, and JSON
leaves out (the fields say it).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import queue
import threading
import time
from logging.handlers import QueueHandler, QueueListener
from typing import Any

# Records waiting for the writer: a few hundred KB at most. A stderr that keeps up empties
# it within microseconds; only one that stopped reading lets it fill.
MAX_QUEUED_RECORDS = 1000

_PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(_PLAIN)

    def format(self, record: logging.LogRecord) -> str:
        tag: str | None = getattr(record, "tag", None)
        if tag:  # the fields are in the tag
            tagged = copy.copy(record)
            tagged.msg, tagged.args = f"{tag} | {record.getMessage()}", None
            return super().format(tagged)
        text = super().format(record)
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        if fields:
            # On the record's first line: the lines after it (a traceback) are the record's body.
            first, newline, body = text.partition("\n")
            text = first + " " + " ".join(f"{key}={_plain_value(value)}" for key, value in fields.items())
            text += newline + body
        return text


def _plain_value(value: Any) -> str:
    """A field as key=value takes it: quoted and escaped (JSON's string syntax) when it holds a
    space, a quote, an equals sign or anything unprintable, so that a value a caller chose (a
    model name in a URL) can never end the line or forge another field or line."""
    text = str(value)
    if text.isprintable() and not any(char in text for char in ' ="'):
        return text
    return json.dumps(text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class QueueingHandler(QueueHandler):
    """Puts records on a bounded queue without ever waiting: one that does not fit is dropped and counted."""

    def __init__(self, records: queue.Queue[Any]) -> None:
        super().__init__(records)
        self.dropped = 0
        self._count_lock = threading.Lock()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Only the message is resolved here, while its arguments still hold what they held;
        # the costly part (time, fields, JSON, a traceback) is the writer thread's.
        # QueueHandler.prepare would format it all on the caller's thread.
        prepared = copy.copy(record)
        prepared.msg = record.getMessage()
        prepared.args = None
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._count_lock:
                self.dropped += 1


class StderrWriter(logging.Handler):
    """Writes formatted records to file descriptor 2 (or `fd`) with os.write: a write that blocks
    on a full pipe holds no lock of sys.stderr's, so the interpreter can still flush it and exit."""

    def __init__(self, fd: int = 2) -> None:
        super().__init__()
        self.fd = fd
        self.setFormatter(PlainFormatter())

    def createLock(self) -> None:
        # No lock: while the daemon serves, the writer thread is its only caller; and at exit
        # logging.shutdown() takes every handler's lock, which a write blocked for good would hold.
        self.lock = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = memoryview((self.format(record) + "\n").encode("utf-8", "backslashreplace"))
            while data:
                data = data[os.write(self.fd, data) :]
        except Exception:
            self.handleError(record)


class _Writer(QueueListener):
    """The writer thread: takes records off the queue and hands them to StderrWriter."""

    def __init__(self, records: queue.Queue[Any], output: logging.Handler) -> None:
        super().__init__(records, output)
        self._records = records

    def stop_within(self, timeout: float) -> bool:
        """Write out what is queued and end the thread; False if stderr would not take it in time.
        (QueueListener.stop raises when the queue is full, and waits as long as stderr does.)"""
        thread = self._thread
        if thread is None:
            return True
        deadline = time.monotonic() + timeout
        try:
            self._records.put(None, timeout=timeout)  # QueueListener's sentinel: the thread ends there
        except queue.Full:
            return False
        thread.join(max(0.0, deadline - time.monotonic()))
        self._thread = None
        return not thread.is_alive()


_handler: QueueingHandler | None = None
_writer: _Writer | None = None
_output = StderrWriter()


def start(level: int | str) -> None:
    """Send the root logger's records through the queue to the writer thread."""
    global _handler, _writer
    root = logging.getLogger()
    root.setLevel(level)
    if _handler is not None:
        return
    records: queue.Queue[Any] = queue.Queue(MAX_QUEUED_RECORDS)
    _handler = QueueingHandler(records)
    _writer = _Writer(records, _output)
    _writer.start()
    root.addHandler(_handler)


def stop(timeout: float = 5.0) -> None:
    """Write out what is queued; later records (nothing serves any more) are written at once.
    If stderr takes nothing for timeout seconds, what is still queued is lost."""
    global _handler, _writer
    if _handler is None or _writer is None:
        return
    root = logging.getLogger()
    root.removeHandler(_handler)
    written = _writer.stop_within(timeout)
    root.addHandler(_output if written else logging.NullHandler())
    _handler, _writer = None, None


def write_to(fd: int) -> None:
    """Write to fd instead of 2 (a worker with a data port: the daemon's stderr, which its fd 2 is not)."""
    _output.fd = fd


def records_dropped() -> int:
    """Records dropped because the queue was full, while the writer runs."""
    return _handler.dropped if _handler is not None else 0


def use_format(log_format: str) -> None:
    """Give the writer, and every other handler of the root logger, the configured format."""
    formatter = JsonFormatter() if log_format == "json" else PlainFormatter()
    for handler in {_output, *logging.getLogger().handlers}:
        handler.setFormatter(formatter)
