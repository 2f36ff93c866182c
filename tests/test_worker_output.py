"""What a model prints: every line a worker writes to its stdout or stderr reaches the daemon's
log through a pipe of the worker's own, tagged with the worker's slot, its pid and the call it
was running; a flood neither stalls the call nor the daemon, and what the log cannot take is
dropped and counted. Real daemons, real workers (tests.package_sources.models.testmodels.Printer).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from client import InterpreterManager
from server.pool.worker_output import BURST_LINES, MAX_LINE_BYTES, OutputReader, RunningCall, open_pipe
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, wait_until
from tests.test_lifecycle import wait_for_replacement, worker_pids
from tests.test_operations import sample, scrape

FLOOD_LINES = 100_000
FLOOD_WIDTH = 100  # bytes a line, newline included: 10 MB in all


@pytest.fixture
def daemon_with(package_dir: Path, tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(*args: str, **sections: Any) -> DaemonProcess:
        config = write_config(tmp_path / f"config-{len(started)}.yaml", package_dir, **sections)
        started.append(DaemonProcess(config, *args).start())
        return started[-1]

    yield start
    for process in started:
        process.assert_clean_stop()


def tagged(log: str, call: str, text: str, pattern: bool = False) -> list[re.Match[str]]:
    """The daemon's lines for a line a worker printed while running call: (slot, pid)."""
    running = call if pattern else re.escape(call)
    return list(re.finditer(rf"worker (\d+) \(pid (\d+), {running}\) \| {text}$", log, re.MULTILINE))


def dropped(log: str) -> tuple[int, int]:
    """Lines and bytes of output the daemon's warnings say were dropped."""
    found = re.findall(r"(\d+) lines \((\d+) bytes\) of its output were dropped", log)
    return sum(int(lines) for lines, _ in found), sum(int(size) for _, size in found)


def test_a_model_that_prints_10_mb_does_not_stall_and_its_lines_are_tagged(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    daemon = daemon_with("--metrics-address", "127.0.0.1:0")  # data ports: calls go to the workers
    with InterpreterManager(daemon.target, timeout=120) as manager:
        package = manager.load_package(package_dir / "models.pt")
        printer = package.load_pickle("models", "printer.pkl", name="printer")
        echo = package.load_pickle("models", "echo.pkl")
        pids = worker_pids(manager)
        started = time.monotonic()
        assert printer.call_method("flood", 10, FLOOD_WIDTH) == 10 * FLOOD_WIDTH
        quiet = time.monotonic() - started

        # Another caller keeps calling the other worker meanwhile; the slowest of its calls says
        # whether the daemon's loop stalled on the flood.
        flooding = threading.Event()
        latencies: list[float] = []

        def other_caller() -> None:
            while not flooding.is_set():
                began = time.monotonic()
                assert echo(7) == 7
                latencies.append(time.monotonic() - began)

        caller = threading.Thread(target=other_caller)
        caller.start()
        try:
            started = time.monotonic()
            assert printer.call_method("flood", FLOOD_LINES, FLOOD_WIDTH) == FLOOD_LINES * FLOOD_WIDTH
            loud = time.monotonic() - started
        finally:
            flooding.set()
            caller.join(60)
    # Bounded, against the same call printing 1 KB (this machine is slow and shared).
    assert loud < 20 + 10 * quiet, (loud, quiet)
    assert latencies and max(latencies) < 5 + 10 * quiet, (max(latencies), quiet)

    # Tagged from the call board, where the daemon reads what a port's worker runs (not each
    # call's end: a short call's lines may be read once its worker is idle again).
    call = f"Invoke {printer.object_id}.flood (model printer v1) on its data port"
    first = tagged(daemon.log, r".*?", "flood 000000000 x+", pattern=True)
    assert len(first) == 2, daemon.log[-3000:]  # the quiet call's and the flood's
    assert all(int(match.group(2)) in pids for match in first)
    assert tagged(daemon.log, call, r"flood \d{9} x+"), daemon.log[-3000:]  # the flood's, while it ran
    # Every line is logged or counted as dropped, none lost nor split.
    assert wait_until(lambda: dropped(daemon.log)[0] > 0, 10), daemon.log[-3000:]
    # Counted whatever their tag: the daemon reads a port's call board, not each call's end, so
    # the last lines of a call may be read once its worker is idle again.
    logged = len(tagged(daemon.log, r".*?", r"flood \d{9} x+", pattern=True))
    lines, size = dropped(daemon.log)
    assert logged + lines == FLOOD_LINES + 10, (logged, lines)
    assert size == lines * FLOOD_WIDTH
    assert 0 < logged < FLOOD_LINES
    assert sample(scrape(daemon), "deployd_worker_output_dropped_bytes_total") == size


def test_a_long_line_is_cut_and_json_keeps_the_tag_as_fields(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    # The daemon's path, which tags each line with the call exactly (a data port's tag comes
    # from the call board: test_a_model_that_prints_10_mb_...).
    daemon = daemon_with(server={"log_format": "json"}, pool={"data_ports": -1})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        package = manager.load_package(package_dir / "models.pt")
        printer = package.load_pickle("models", "printer.pkl", name="printer")
        printer("a line from the model")
        printer.call_method("long_line", 40_000)
        pids = worker_pids(manager)

    def entries() -> list[dict[str, Any]]:
        found = []
        for line in daemon.lines:
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("logger") == "server.pool.worker_output" and entry["level"] == "INFO":
                    found.append(entry)
        return found

    assert wait_until(lambda: len(entries()) == 2, 10), daemon.log[-3000:]
    short, long = entries()
    assert short["message"] == "a line from the model"
    assert short["call"] == f"Invoke {printer.object_id}.__call__ (model printer v1)"
    assert short["model"] == printer.object_id
    assert short["pid"] in pids and short["worker"] in (0, 1)
    assert long["message"] == "long:" + "L" * (16 * 1024 - 5) + f" [cut: {40_000 - 16 * 1024} more bytes]"


def test_output_pipes_leak_no_fd_nor_process_across_kills_and_a_last_unfinished_line_is_logged(
    daemon_with: Callable[..., DaemonProcess], package_dir: Path
) -> None:
    daemon = daemon_with(pool={"workers": 1})

    def daemon_fds() -> int:
        return len(os.listdir(f"/proc/{daemon.pid}/fd"))

    with InterpreterManager(daemon.target, timeout=60) as manager:
        printer = manager.load_package(package_dir / "models.pt").load_pickle("models", "printer.pkl")
        printer("warm")
        before = daemon_fds()
        for attempt in range(3):
            pids = worker_pids(manager)
            text = f"no newline yet {attempt}"
            printer.call_method("unfinished", text)
            os.kill(next(iter(pids)), signal.SIGKILL)
            wait_for_replacement(manager, pids)
            # The line it had not finished is logged at its end, tagged with the worker it came from.
            assert wait_until(lambda text=text: f"| {text}\n" in daemon.log, 10), daemon.log[-3000:]
            assert f"(pid {next(iter(pids))}, idle) | {text}" in daemon.log
        printer("still serves")
        # Each worker's channel, output pipe and process sentinels were closed with it.
        assert wait_until(lambda: daemon_fds() == before, 10), (daemon_fds(), before)
    # assert_clean_stop (the fixture) fails on any process left behind.


# ---------------------------------------------------------------------------- the reader alone


def test_the_reader_joins_split_lines_cuts_long_ones_and_counts_what_it_drops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flood = BURST_LINES * 3

    async def run() -> list[int]:
        read_end, write_end = open_pipe()
        dropped: list[int] = []
        reader = OutputReader(read_end, 3, 42, dropped.append)
        reader.running = lambda: RunningCall("Invoke m.f", "m")
        os.write(write_end, b"one\ntw")
        await asyncio.sleep(0.05)  # the reader sees half a line first
        os.write(write_end, b"o\n" + b"x" * (MAX_LINE_BYTES + 10) + b"\n")
        os.write(write_end, b"".join(b"f%08d\n" % index for index in range(flood)) + b"unfinished")
        os.close(write_end)
        await asyncio.wait_for(reader.closed.wait(), 10)
        return dropped

    with caplog.at_level(logging.INFO, logger="server.pool.worker_output"):
        dropped = asyncio.run(run())
    lines = [record for record in caplog.records if record.levelno == logging.INFO]
    assert [record.getMessage() for record in lines[:3]] == [
        "one",
        "two",
        "x" * MAX_LINE_BYTES + " [cut: 10 more bytes]",
    ]
    assert all(record.tag == "worker 3 (pid 42, Invoke m.f)" for record in lines)
    assert lines[0].fields == {"worker": 3, "pid": 42, "call": "Invoke m.f", "model": "m"}
    assert lines[-1].getMessage() == "unfinished"  # at EOF
    floods = len(lines) - 4
    [warning] = [record for record in caplog.records if record.levelno == logging.WARNING]
    report = re.search(r"(\d+) lines \((\d+) bytes\) of its output were dropped", warning.getMessage())
    assert report is not None
    assert floods + int(report.group(1)) == flood
    assert int(report.group(2)) == sum(dropped) == int(report.group(1)) * 10
