"""Memory: what each added worker costs, with a model of about 200 MB of weights loaded.

torch::deploy keeps one copy of the weights for all its interpreters; a pool of worker
processes keeps one per worker unless the weights are shared. This loads a stack of big
nn.Linear layers into a daemon with 1 worker and one with N workers (N = os.cpu_count(),
at least 2), calls it once on every worker (a worker's weights may be mapped but not yet
touched; a call reads them all), and then, with the client gone, sums the proportional
set size (PSS, /proc/PID/smaps_rollup) of the daemon and every process below it (fork
server, workers). PSS splits each shared page among the processes that map it, so the
total counts shared weights once.

The daemon's own PSS varies by tens of MB from one start to the next, so each pool size
is measured on several daemons (sizes alternating) and the median total counts.
Reported: the total for each pool size, the cost of each added worker ((median total
with N - median total with 1) / (N - 1), target <= 60 MB), and for each worker its shared
(Shared_Clean + Shared_Dirty) and private (Private_Clean + Private_Dirty) bytes.
MB = 10^6 bytes. The CSV row is the latency of those first calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bench.common import Context, Daemon, Row, build_packages, run_in_child, workers_text
from server.pool.procinfo import MemoryUsage, descendants_of, memory_usage

MB = 1e6


@dataclass(frozen=True)
class Params:
    width: int  # each layer is nn.Linear(width, width)
    layers: int
    repeats: int  # daemons per pool size, sizes alternating; the median total counts


FULL = Params(width=3584, layers=4, repeats=3)  # 4 x 3584 x 3585 x 4 bytes = 205.6 MB
SMOKE = Params(width=256, layers=2, repeats=1)


@dataclass(frozen=True)
class Measurement:
    """One daemon's memory after the model was loaded and called on every worker (bytes)."""

    total_pss: int
    daemon_pss: int
    workers_pss: int
    processes: int
    workers: list[tuple[int, MemoryUsage]]  # (pid, memory) in slot order
    latencies: list[float]  # of the calls, seconds

    def breakdown(self) -> str:
        others = self.total_pss - self.daemon_pss - self.workers_pss
        return (
            f"daemon {self.daemon_pss / MB:.1f} + workers {self.workers_pss / MB:.1f}"
            f" + fork server and helpers {others / MB:.1f} ({self.processes} processes)"
        )


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    spec = {"kind": "big", "width": params.width, "layers": params.layers}
    package = str(build_packages(ctx.workdir / "packages", {"big": spec})["big"])
    weights = 4 * params.width * (params.width + 1) * params.layers
    layer = f"nn.Linear({params.width}, {params.width})"
    ctx.report.line(f"memory: model of {params.layers} x {layer}, {weights / MB:.1f} MB of weights")
    sizes = sorted({1, max(2, ctx.cpu_count)})
    runs: dict[int, list[Measurement]] = {workers: [] for workers in sizes}
    for _ in range(params.repeats):
        for workers in sizes:
            runs[workers].append(measure(ctx, package, params.width, workers))
    totals = {workers: report_size(ctx, workers, measured) for workers, measured in runs.items()}
    few, many = sizes[0], sizes[-1]
    per_worker = (totals[many] - totals[few]) / (many - few)
    what = f"memory: PSS per added worker (({workers_text(many)} - {workers_text(few)}) / {many - few})"
    ctx.report.check(what, per_worker / MB, "<=", 60, unit="MB")


def measure(ctx: Context, package: str, width: int, workers: int) -> Measurement:
    """Start a daemon, load and call the model from a child, then read every process's smaps_rollup."""
    with Daemon(ctx.workdir, workers) as daemon:
        spec = {"target": daemon.target, "package": package, "width": width}
        loaded = run_in_child("bench.memory:load_and_call", spec, timeout=600)
        # The client has exited: of our processes, only the daemon's map torch's pages now.
        daemon_pid = daemon.pid
        usage = {pid: memory_usage(pid) for pid in {daemon_pid} | descendants_of(daemon_pid)}
    pss = {pid: memory.pss_bytes for pid, memory in usage.items()}
    return Measurement(
        total_pss=sum(pss.values()),
        daemon_pss=pss.get(daemon_pid, 0),
        workers_pss=sum(pss.get(pid, 0) for pid in loaded["pids"]),
        processes=len(usage),
        workers=[(pid, usage.get(pid, memory_usage(pid))) for pid in loaded["pids"]],
        latencies=loaded["latencies"],
    )


def report_size(ctx: Context, workers: int, runs: list[Measurement]) -> int:
    """Print the median run of one pool size (and every run's total); returns the median total."""
    ordered = sorted(runs, key=lambda run: run.total_pss)
    median = ordered[(len(ordered) - 1) // 2]
    latencies = [latency for run in runs for latency in run.latencies]
    ctx.report.add(Row.from_samples("memory_first_calls", "deployd", workers, latencies, sum(latencies)))
    every = ", ".join(f"{run.total_pss / MB:.1f}" for run in runs)
    ctx.report.line(
        f"memory: {workers_text(workers)}: total PSS {median.total_pss / MB:.1f} MB = {median.breakdown()}"
        f" [median of {len(runs)} daemons: {every} MB]"
    )
    for index, (pid, memory) in enumerate(median.workers):
        ctx.report.line(
            f"memory: {workers_text(workers)}, worker {index} (pid {pid}): PSS {memory.pss_bytes / MB:.1f} MB,"
            f" shared {memory.shared_bytes / MB:.1f} MB, private {memory.private_bytes / MB:.1f} MB"
        )
    return median.total_pss


# ---------------------------------------------------------------------------- client (child)


def load_and_call(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: load the model, call it once on every worker.

    Idle workers take calls in turn, so sequential calls reach each one soon; each call
    says which worker ran it. Returns the calls' latencies and the workers' pids.
    """
    import torch

    from client import InterpreterManager

    with InterpreterManager(spec["target"], timeout=600) as manager:
        model = manager.load_package(spec["package"]).load_pickle("model", "model.pkl")
        pids = [worker.pid for worker in manager.status().workers]
        x = torch.ones(1, spec["width"])
        latencies, called = [], set()
        deadline = time.perf_counter() + 300
        for _ in range(20 * len(pids)):
            started = time.perf_counter()
            called.add(model.call_method("forward_pid", x))
            latencies.append(time.perf_counter() - started)
            if called >= set(pids):
                return {"latencies": latencies, "pids": pids}
            if time.perf_counter() > deadline:
                break
    raise AssertionError(f"calls reached workers {sorted(called)}, not all of {pids}")
