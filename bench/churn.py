"""Churn: load a package, call it, unload it; repeat. Unloading must give back what loading took.

A client child streams the package (a nn.Linear of `width`: 16 MB of weights in the full
run), loads its pickle on every worker, calls it on every worker and unloads the package,
`cycles` times, against a daemon with 2 workers. After every cycle it reads /proc for the
daemon and each worker. Printed, per cycle: how much each process's RSS grew (KB/cycle,
from the end of the first cycle to the end of the last), and the ratio of RSS after the
last cycle to after the first (target <= 1.10); deleted deployd segments still mapped in
a worker after the last cycle (target 0: an unloaded package's weights are gone); open
fds of the daemon and the workers, and deployd segments in /dev/shm, before the first
cycle, after it and after the last (target: flat from the first cycle on).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import MIB, Context, Daemon, Row, build_packages, run_in_child

WORKERS = 2
KB = 1024


@dataclass(frozen=True)
class Params:
    cycles: int
    width: int


FULL = Params(cycles=200, width=2048)  # 4 * 2048 * 2049 bytes: 16.8 MB of weights
SMOKE = Params(cycles=5, width=64)


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    spec = {"kind": "big", "width": params.width, "layers": 1}
    package = build_packages(ctx.workdir / "packages", {"churn": spec})["churn"]
    weights = 4 * params.width * (params.width + 1)  # float32 weight and bias
    with Daemon(ctx.workdir, WORKERS) as daemon:
        child_spec = {"target": daemon.target, "daemon_pid": daemon.pid, "package": str(package), **asdict(params)}
        result = run_in_child("bench.churn:load_call_unload", child_spec, timeout=120 + 5 * params.cycles)
    cycles = result["cycles"]
    ctx.report.add(Row.from_samples("churn", "deployd", 1, result["latencies"], sum(result["latencies"])))
    ctx.report.line(
        f"churn: {cycles} cycles of load/call/unload, nn.Linear({params.width}, {params.width}) ="
        f" {weights / KB:,.0f} KB of weights, {WORKERS} workers:"
        f" {sum(result['latencies']) / cycles * 1000:.0f} ms a cycle"
    )
    first, last = result["after_first"], result["after_last"]
    for who in first["rss"]:
        start, end = first["rss"][who], last["rss"][who]
        per_cycle = (end - start) / KB / max(cycles - 1, 1)
        ctx.report.line(
            f"churn: {who} RSS {start / MIB:.1f} MiB after the first cycle, {end / MIB:.1f} MiB after the last:"
            f" {per_cycle:+.1f} KB/cycle"
        )
        if who != "daemon":
            ctx.report.check(f"churn: {who} RSS after the last cycle / after the first", end / start, "<=", 1.1)
    report_daemon_trend(ctx, result["daemon_rss"])
    ctx.report.check("churn: deleted deployd segments still mapped in workers", last["deleted_maps"], "<=", 0, "maps")
    before = result["before"]
    for what, unit in (("daemon fds", "fds"), ("worker fds", "fds"), ("shm segments", "segments")):
        key = what.replace(" ", "_")
        ctx.report.line(
            f"churn: {what} before / after the first cycle / after the last: {before[key]} / {first[key]} / {last[key]}"
        )
        gained = last[key] - first[key]
        ctx.report.check(f"churn: {what} gained from the first cycle to the last", gained, "<=", 0, unit)


def report_daemon_trend(ctx: Context, series: list[int]) -> None:
    """The daemon's RSS after every cycle: where glibc places each streamed package among
    long-lived objects makes it swing by 10-30% from one cycle to the next, so one reading
    against another says little. A leak shows as a trend: the median of the last tenth of
    the cycles against the median of the first tenth."""
    tenth = max(len(series) // 10, 1)
    early, late = statistics.median(series[:tenth]), statistics.median(series[-tenth:])
    ctx.report.line(
        f"churn: daemon RSS over the cycles {min(series) / MIB:.1f}-{max(series) / MIB:.1f} MiB;"
        f" median of the first {tenth} {early / MIB:.1f} MiB, of the last {tenth} {late / MIB:.1f} MiB"
    )
    what = f"churn: daemon RSS, median of the last {tenth} cycles / of the first {tenth}"
    ctx.report.check(what, late / early, "<=", 1.1)


# ---------------------------------------------------------------------------- client (child)


def load_call_unload(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: the cycles, with /proc read after each. Returns the readings."""
    import torch

    from client import InterpreterManager

    daemon_pid = spec["daemon_pid"]
    x = torch.ones(1, spec["width"])
    data = Path(spec["package"]).read_bytes()  # read once, sent every cycle
    latencies: list[float] = []
    with InterpreterManager(spec["target"], timeout=120) as manager:
        pids = [worker.pid for worker in manager.status().workers]
        before = readings(daemon_pid, pids)
        after_first = after_last = before
        daemon_rss: list[int] = []
        for cycle in range(spec["cycles"]):
            started = time.perf_counter()
            package = manager.load_package(data)
            model = package.load_pickle("model", "model.pkl")
            called = {model.call_method("forward_pid", x) for _ in range(4 * len(pids))}
            package.unload()
            latencies.append(time.perf_counter() - started)
            if called != set(pids):
                raise AssertionError(f"cycle {cycle}: calls reached workers {sorted(called)}, not all of {pids}")
            if [worker.pid for worker in manager.status().workers] != pids:
                raise AssertionError(f"cycle {cycle}: a worker was replaced")
            after_last = readings(daemon_pid, pids)
            daemon_rss.append(after_last["rss"]["daemon"])
            if cycle == 0:
                after_first = after_last
    return {
        "cycles": spec["cycles"],
        "latencies": latencies,
        "before": before,
        "after_first": after_first,
        "after_last": after_last,
        "daemon_rss": daemon_rss,
    }


def readings(daemon_pid: int, worker_pids: list[int]) -> dict[str, Any]:
    rss = {"daemon": rss_bytes(daemon_pid)}
    rss.update({f"worker {index}": rss_bytes(pid) for index, pid in enumerate(worker_pids)})
    return {
        "rss": rss,
        "deleted_maps": sum(deleted_segments_mapped(pid) for pid in worker_pids),
        "daemon_fds": open_fds(daemon_pid),
        "worker_fds": sum(open_fds(pid) for pid in worker_pids),
        "shm_segments": len([name for name in os.listdir("/dev/shm") if name.startswith(f"deployd-{daemon_pid}-")]),
    }


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def deleted_segments_mapped(pid: int) -> int:
    """Mappings of deployd segments that were unlinked: memory nobody can name any more."""
    with open(f"/proc/{pid}/maps") as maps:
        return sum(1 for line in maps if "/deployd-" in line and line.rstrip().endswith("(deleted)"))
