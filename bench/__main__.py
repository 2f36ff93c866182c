"""python -m bench [--smoke] [--only NAME,...]: run the benchmarks, print the table, write the CSV.

--smoke runs every benchmark in a tiny configuration (few iterations, small tensors, a
small model): it checks that the suite works, not how fast anything is.

Writes bench/results/results.csv (the table's rows) and bench/results/summary.txt (the
table, the ratio lines and anything that looked wrong in a daemon). Exits 1 if a
benchmark could not run; a missed target is reported, never an error.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import (
    aio,
    bandwidth,
    batching,
    batching_churn,
    chaos,
    churn,
    direct,
    direct_scaling,
    grpcio_versions,
    hops,
    http_servers,
    http_v2,
    memory,
    names,
    overhead,
    scaling,
    session_churn,
    startup,
    swaps,
    threshold,
    v2load,
    warmup,
)
from bench.common import DAEMON_NOTES, DAEMON_PIDS, RESULTS_DIR, Context, Report, format_table, write_csv

BENCHMARKS: dict[str, Callable[[Context], None]] = {
    "scaling": scaling.run,
    "overhead": overhead.run,
    "hops": hops.run,
    "bandwidth": bandwidth.run,
    "threshold": threshold.run,
    "memory": memory.run,
    "startup": startup.run,
    "chaos": chaos.run,
    "churn": churn.run,
    "session_churn": session_churn.run,
    "batching_churn": batching_churn.run,
    "names": names.run,
    "swaps": swaps.run,
    "v2": v2load.run,
    "batching": batching.run,
    "aio": aio.run,
    "grpcio": grpcio_versions.run,
    "direct": direct.run,
    "direct_scaling": direct_scaling.run,
    "http_servers": http_servers.run,
    "http_v2": http_v2.run,
    "warmup": warmup.run,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="deployd's benchmark suite")
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration: checks the code, not speed")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(BENCHMARKS)}")
    options = parser.parse_args(argv)
    options.names = [name.strip() for name in options.only.split(",") if name.strip()] or list(BENCHMARKS)
    unknown = [name for name in options.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return options


def run_benchmarks(names: list[str], smoke: bool, report: Report) -> list[str]:
    """Run each benchmark in turn; returns the names of those that failed."""
    failed = []
    with tempfile.TemporaryDirectory(prefix="deployd-bench-") as workdir:
        ctx = Context(smoke=smoke, cpu_count=os.cpu_count() or 1, workdir=Path(workdir), report=report)
        for name in names:
            print(f"== {name}{' (smoke)' if smoke else ''}", flush=True)
            started = time.monotonic()
            try:
                BENCHMARKS[name](ctx)
            except Exception:
                traceback.print_exc()
                failed.append(name)
                report.line(f"{name}: FAILED (see the traceback above)")
            print(f"   {name} took {time.monotonic() - started:.1f}s", flush=True)
    return failed


def summary(report: Report) -> str:
    parts = [format_table(report.rows), "", *report.lines]
    if DAEMON_NOTES:
        parts += ["", "daemon notes:", *(f"  {note}" for note in DAEMON_NOTES)]
    return "\n".join(parts) + "\n"


def leftover_shared_memory(before: set[str]) -> set[str]:
    """Segments the benchmarks' daemons made and left (named deployd-<daemon pid>-<n>)."""
    if not os.path.isdir("/dev/shm"):
        return set()
    ours = tuple(f"deployd-{pid}-" for pid in DAEMON_PIDS)
    return {name for name in set(os.listdir("/dev/shm")) - before if name.startswith(ours)}


def main(argv: list[str]) -> int:
    options = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every finally block stops the processes it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    report = Report()
    failed = run_benchmarks(options.names, options.smoke, report)
    segments = leftover_shared_memory(shm_before)
    if segments:
        DAEMON_NOTES.append(f"shared-memory segments left in /dev/shm: {sorted(segments)}")
    text = summary(report)
    print("\n" + text, end="")
    write_csv(report.rows, RESULTS_DIR / "results.csv")
    (RESULTS_DIR / "summary.txt").write_text(text)
    print(f"wrote {RESULTS_DIR / 'results.csv'} and {RESULTS_DIR / 'summary.txt'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
