"""What every benchmark shares: processes, the daemon, statistics, the report.

The process that runs `python -m bench` only supervises. It builds packages, starts
daemons and echo servers, and runs every load generator in a child process of its own
(`run_in_child`), so the client's CPU time and memory never mix with the supervisor's.
It imports neither torch nor the client, so it adds nothing to the memory it measures.

Every process started here is stopped in a `finally` (SIGTERM, then SIGKILL), every
loop is bounded by a count and a time limit, and servers listen on 127.0.0.1 port 0.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from server.pool.procinfo import alive, descendants_of

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
MIB = 1024 * 1024
# glibc malloc keeps blocks up to 32 MiB instead of mapping and unmapping them per call.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}

# Things that looked wrong in a daemon (bad exit, leftovers, errors in its log): printed at the end.
DAEMON_NOTES: list[str] = []
# Every daemon a benchmark started: the leftover check counts only their shared memory (segment
# names carry the daemon's pid), not that of whatever else runs on the host meanwhile.
DAEMON_PIDS: set[int] = set()


class BenchError(RuntimeError):
    """A benchmark could not run (a process failed to start, timed out or crashed)."""


@dataclass(frozen=True)
class Context:
    """What a benchmark's run() gets: the configuration and where to put things."""

    smoke: bool
    cpu_count: int
    workdir: Path
    report: Report


# ---------------------------------------------------------------------------- statistics


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0..100), interpolating between the two nearest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def workers_text(count: int) -> str:
    return f"{count} worker" if count == 1 else f"{count} workers"


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def paired_ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Round by round ratios: strategies measured in the same round share its host noise."""
    return [ratio(a, b) for a, b in zip(numerators, denominators, strict=True)]


# ---------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Row:
    """One result line in torch::deploy's benchmark format; latencies in milliseconds."""

    benchmark: str
    strategy: str
    n_threads: int
    work_items_completed: int
    work_items_per_second: float
    p25_latency: float
    p50_latency: float
    p95_latency: float
    device: str = "cpu"

    @classmethod
    def from_samples(
        cls, benchmark: str, strategy: str, n_threads: int, latencies_s: list[float], elapsed_s: float
    ) -> Row:
        """A row from per-item latencies (seconds) and the wall time they took together."""
        p25, p50, p95 = (percentile(latencies_s, p) * 1000.0 for p in (25, 50, 95))
        per_second = ratio(len(latencies_s), elapsed_s)
        return cls(benchmark, strategy, n_threads, len(latencies_s), per_second, p25, p50, p95)


CSV_COLUMNS = tuple(column.name for column in fields(Row))


@dataclass
class Report:
    """Rows for the table and CSV, and the lines that compare them (ratios against targets)."""

    rows: list[Row] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def line(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)

    def check(self, what: str, values: float | list[float], op: str, target: float, unit: str = "x") -> None:
        """Print 'what = value (target op target): met', for one value or the median of per-round values."""
        value = statistics.median(values) if isinstance(values, list) else values
        met = value >= target if op == ">=" else value <= target
        digits, space = (2, "") if unit == "x" else (1, " ")
        shown = f"{value:.{digits}f}{space}{unit}"
        if isinstance(values, list) and len(values) > 1:
            shown += f" (median of {len(values)} rounds, {min(values):.{digits}f}-{max(values):.{digits}f})"
        goal = f"{target:g}{space}{unit}"
        self.line(f"{what} = {shown} (target {op} {goal}): {'met' if met else 'NOT met'}")


def format_cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_table(rows: list[Row]) -> str:
    cells = [list(CSV_COLUMNS)] + [[format_cell(value) for value in astuple(row)] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(CSV_COLUMNS))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([format_cell(value) for value in astuple(row)])


# ---------------------------------------------------------------------------- processes


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def stop_process(process: subprocess.Popen[Any], grace: float = 10.0) -> int:
    """SIGTERM, wait up to grace seconds, then SIGKILL. Returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(grace)
    return process.returncode


def kill_leftovers(pids: set[int]) -> set[int]:
    """SIGKILL those of pids still alive (our daemon's children); returns which they were."""
    left = {pid for pid in pids if alive(pid)}
    for pid in left:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def python_command(*args: str) -> list[str]:
    return [sys.executable, *args]


class Child:
    """`bench.child`: a function of a bench module run in a fresh Python process.

    target is "module:function"; the function takes the JSON spec and returns a JSON-able
    value. The child also gets an alarm, so it dies on its own if it outlives `timeout`.
    """

    def __init__(self, target: str, spec: dict[str, Any], timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self._directory = tempfile.TemporaryDirectory(prefix="bench-child-")
        self._result = Path(self._directory.name) / "result.json"
        command = python_command("-m", "bench.child", target, json.dumps(spec), str(self._result), str(int(timeout)))
        self.process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL)

    def result(self) -> Any:
        """Wait for the child (stopping it in any case) and return what its function returned."""
        try:
            code = self.process.wait(self.timeout)
            if code != 0:
                raise BenchError(f"{self.target} exited with code {code}")
            return json.loads(self._result.read_text())
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.target} did not finish in {self.timeout:.0f}s") from None
        finally:
            self.close()

    def close(self) -> None:
        """Stop the process if it still runs, and remove its result file."""
        stop_process(self.process)
        self._directory.cleanup()


def run_in_child(target: str, spec: dict[str, Any], timeout: float) -> Any:
    return Child(target, spec, timeout).result()


def run_children(jobs: list[tuple[str, dict[str, Any]]], timeout: float) -> list[Any]:
    """Run several children at once; returns their results in order."""
    children: list[Child] = []
    try:
        for target, spec in jobs:
            children.append(Child(target, spec, timeout))
        return [child.result() for child in children]
    finally:
        for child in children:
            child.close()


def build_packages(directory: Path, specs: dict[str, dict[str, Any]], timeout: float = 300.0) -> dict[str, Path]:
    """Build one torch.package per spec (see bench.models), each in its own process, in parallel."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{name}.pt" for name in specs}
    jobs = [("bench.models:export", {**spec, "out": str(paths[name])}) for name, spec in specs.items()]
    run_children(jobs, timeout)
    return paths


# ---------------------------------------------------------------------------- the daemon

_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_TROUBLE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")


class Daemon:
    """The real deployd daemon in a subprocess, on 127.0.0.1 port 0, with a config of its own.

    `with Daemon(...) as daemon:` starts it and waits until it serves; leaving the block
    stops it (SIGTERM, then SIGKILL for it and anything it left).
    """

    def __init__(
        self, workdir: Path, workers: int, env: dict[str, str] | None = None, config: dict[str, Any] | None = None
    ) -> None:
        """config: top-level keys added to the config (e.g. models:, with its packages.directory)."""
        self.workers = workers
        self._extra_config = config or {}
        self.label = f"daemon with {workers_text(workers)}"
        self.env = {**os.environ, **(env or {})}
        self.port = 0
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._directory = Path(tempfile.mkdtemp(prefix="daemon-", dir=workdir))
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchError(f"{self.label} was not started")
        return self.process.pid

    def write_config(self) -> Path:
        packages = self._directory / "packages"
        packages.mkdir(exist_ok=True)
        config = {
            # The daemon's path, as the benchmarks were written for it; those of the direct path
            # set pool.data_ports (DEPLOYD_POOL_DATA_PORTS=0 in the environment overrides this).
            "pool": {"workers": self.workers, "start_timeout_seconds": 120.0, "data_ports": -1},
            "packages": {"directory": str(packages)},
            # The per-call log line is an operator's choice; the benchmarks measure the transport.
            "server": {"shutdown_grace_seconds": 5.0, "log_calls": False},
            **self._extra_config,
        }
        path = self._directory / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def launch(self) -> None:
        command = python_command("-m", "server", "serve", "--config", str(self.write_config()))
        command += ["--address", "127.0.0.1:0"]
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        DAEMON_PIDS.add(self.process.pid)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        with self.process.stderr:
            for line in self.process.stderr:
                self.lines.append(line)
                match = _LISTENING.search(line)
                if match and not self._listening.is_set():
                    self.port = int(match.group(2))
                    self._listening.set()

    def wait_serving(self, timeout: float = 180.0) -> None:
        process = self.process
        if process is None:
            raise BenchError(f"{self.label} was not started")
        if not wait_until(lambda: self._listening.is_set() or process.poll() is not None, timeout):
            raise BenchError(f"{self.label} did not start in {timeout:.0f}s:\n{self.log}")
        if not self._listening.is_set():
            raise BenchError(f"{self.label} exited with {process.returncode}:\n{self.log}")

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM and wait; SIGKILL it and its children if it hangs. Notes what looked wrong."""
        if self.process is None:
            return
        children = descendants_of(self.pid)
        started = time.monotonic()
        code = stop_process(self.process, timeout)
        seconds = time.monotonic() - started
        if self._reader is not None:
            self._reader.join(10)
        wait_until(lambda: not any(alive(pid) for pid in children), 10)
        leftovers = kill_leftovers(children)
        self._note_problems(code, seconds, leftovers)
        self.process = None

    def _note_problems(self, code: int, seconds: float, leftovers: set[int]) -> None:
        if code != 0:
            DAEMON_NOTES.append(f"{self.label}: exit code {code} after SIGTERM (expected 0)")
        if seconds > 10:
            DAEMON_NOTES.append(f"{self.label}: took {seconds:.1f}s to stop after SIGTERM")
        if leftovers:
            DAEMON_NOTES.append(f"{self.label}: left child processes {sorted(leftovers)} (killed)")
        trouble = [line.strip() for line in self.lines if _TROUBLE.search(line)]
        if trouble:
            DAEMON_NOTES.append(f"{self.label}: {len(trouble)} error lines in its log, first: {trouble[0]}")

    def __enter__(self) -> Daemon:
        try:
            self.launch()
            self.wait_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_daemons(stack: ExitStack, daemons: list[Daemon]) -> list[Daemon]:
    """Launch all, then wait for each, so they boot in parallel; the stack stops them all."""
    for daemon in daemons:
        stack.callback(daemon.stop)
        daemon.launch()
    for daemon in daemons:
        daemon.wait_serving()
    return daemons


# ---------------------------------------------------------------------------- load generation
# Used inside load-generator children (pure Python: the callers bring torch and grpc).


def timed_calls(call: Callable[[], object], seconds: float, max_calls: int) -> list[float]:
    """Call back to back until seconds pass or max_calls are done; returns each latency."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(latencies) < max_calls:
        started = time.perf_counter()
        call()
        finished = time.perf_counter()
        latencies.append(finished - started)
        if finished >= deadline:
            break
    return latencies


def threaded_window(
    call: Callable[[], object], n_threads: int, seconds: float, max_calls_per_thread: int
) -> tuple[list[float], float]:
    """n_threads threads call back to back for one window; returns all latencies and the wall time."""
    clock: dict[str, float] = {}
    per_thread: list[list[float]] = [[] for _ in range(n_threads)]
    errors: list[BaseException] = []

    def start_clock() -> None:
        clock["start"] = time.perf_counter()

    barrier = threading.Barrier(n_threads, action=start_clock)

    def caller(index: int) -> None:
        try:
            barrier.wait(60)
            per_thread[index] = timed_calls(call, seconds, max_calls_per_thread)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 180)
    if errors:
        raise errors[0]
    if any(thread.is_alive() for thread in threads):
        raise BenchError("a load thread did not finish")
    elapsed = time.perf_counter() - clock["start"]
    return [latency for latencies in per_thread for latency in latencies], elapsed


def interleaved_rounds(
    calls: dict[str, Callable[[], object]], rounds: int, seconds: float, max_calls: int
) -> dict[str, dict[str, Any]]:
    """Sequential calls: each round gives every call one window in turn; returns Samples as JSON."""
    samples = {name: Samples() for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            latencies = timed_calls(call, seconds, max_calls)
            samples[name].add(latencies, time.perf_counter() - started)
    return {name: collected.to_json() for name, collected in samples.items()}


@dataclass
class Samples:
    """One strategy's windows, one per round: each window's latencies (s) and wall time (s)."""

    windows: list[tuple[list[float], float]] = field(default_factory=list)

    def add(self, latencies: list[float], elapsed: float) -> None:
        self.windows.append((latencies, elapsed))

    @property
    def latencies(self) -> list[float]:
        return [latency for latencies, _ in self.windows for latency in latencies]

    @property
    def elapsed(self) -> float:
        return sum(elapsed for _, elapsed in self.windows)

    def rates(self) -> list[float]:
        """Items per second in each round."""
        return [ratio(len(latencies), elapsed) for latencies, elapsed in self.windows]

    def p50s(self) -> list[float]:
        """The median latency of each round."""
        return [percentile(latencies, 50) for latencies, _ in self.windows]

    def row(self, benchmark: str, strategy: str, n_threads: int) -> Row:
        return Row.from_samples(benchmark, strategy, n_threads, self.latencies, self.elapsed)

    def to_json(self) -> dict[str, Any]:
        return {"windows": self.windows}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Samples:
        return cls([(list(latencies), float(elapsed)) for latencies, elapsed in data["windows"]])
