"""Logs never hold up a call: records go to a bounded queue that one thread writes out, and
records that do not fit are dropped and counted (deployd_log_records_dropped_total)."""

from __future__ import annotations

import json
import logging
import queue
import re
import sys
import threading
import time
from pathlib import Path

import grpc

from deployd_wire.proto.deployd_pb2 import StatusRequest
from deployd_wire.proto.deployd_pb2_grpc import DeploydStub
from server import logs
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess
from tests.test_operations import sample, scrape


class StalledReaderDaemon(DaemonProcess):
    """A daemon whose stderr nobody reads once it is listening, until resume_reading()."""

    def __init__(self, config_path: Path, *extra_args: str) -> None:
        super().__init__(config_path, *extra_args)
        self._reading = threading.Event()

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        with self.process.stderr:
            while line := self.process.stderr.readline():
                self.lines.append(line)
                match = re.search(r"listening on (\S+):(\d+)", line)
                if match and not self._listening.is_set():
                    self.port = int(match.group(2))
                    self._listening.set()
                if self._listening.is_set():
                    self._reading.wait()

    def resume_reading(self) -> None:
        self._reading.set()


def test_calls_are_answered_while_nobody_reads_the_log(package_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", package_dir, server={"log_calls": True, "log_format": "plain"})
    process = StalledReaderDaemon(config, "--metrics-address", "127.0.0.1:0").start()
    try:
        # Each call logs a line of ~150 bytes: the 64 KiB pipe is full after ~450 calls,
        # the queue (logs.MAX_QUEUED_RECORDS) some hundreds later; the rest are dropped.
        calls = logs.MAX_QUEUED_RECORDS + 1500
        started = time.monotonic()
        with grpc.insecure_channel(process.target) as channel:
            status = DeploydStub(channel).Status
            for _ in range(calls):
                status(StatusRequest(), timeout=10)
        elapsed = time.monotonic() - started
        assert elapsed < 60, f"{calls} calls took {elapsed:.1f}s"
        assert sample(scrape(process), "deployd_log_records_dropped_total") > 0
    finally:
        process.resume_reading()
        process.assert_clean_stop()
    assert "stopped" in process.lines[-1], process.lines[-3:]


# ---------------------------------------------------------------------------- in-process


def test_a_full_queue_drops_and_counts_instead_of_blocking() -> None:
    handler = logs.QueueingHandler(queue.Queue(maxsize=2))  # no writer: the queue stays full
    for number in range(5):
        handler.handle(logging.LogRecord("deployd.test", logging.INFO, __file__, 1, "n=%d", (number,), None))
    assert handler.dropped == 3


def test_the_writer_thread_formats_fields_and_tracebacks(tmp_path: Path) -> None:
    records: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=10)
    handler = logs.QueueingHandler(records)
    fields = {"method": "Invoke", "status": "OK"}
    handler.handle(logging.LogRecord("deployd.calls", logging.INFO, __file__, 1, "call %s", ("one",), None))
    try:
        raise ValueError("boom")
    except ValueError:
        failure = logging.LogRecord("deployd", logging.ERROR, __file__, 2, "failed", None, sys.exc_info())
    failure.fields = fields
    handler.handle(failure)
    # On the caller's thread only the message is resolved; formatting is left to the writer.
    queued = [records.get_nowait(), records.get_nowait()]
    assert queued[0].msg == "call one" and queued[0].args is None
    assert queued[1].exc_info is not None and queued[1].exc_text is None

    path = tmp_path / "log"
    with path.open("wb") as file:
        writer = logs.StderrWriter(file.fileno())
        writer.setFormatter(logs.JsonFormatter())
        for record in queued:
            writer.handle(record)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["message"] == "call one"
    assert lines[1]["method"] == "Invoke" and "ValueError: boom" in lines[1]["exception"]
