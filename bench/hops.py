"""Hops: where a small Invoke's time goes between the daemon and its worker.

Sequential identity calls on a 16-element tensor (the overhead benchmark's call), then
the daemon's own histograms, read from its /metrics: `deployd_worker_call_seconds` by
phase (to_worker: the daemon writes -> the worker has read; in_worker: read -> the
worker writes its reply; to_daemon: written -> the daemon has read; timestamps on the
shared monotonic clock) and `deployd_queue_wait_seconds`. Quantiles are interpolated
within histogram buckets (10 us wide below 100 us). The two hops are the process
wake-ups an echo server does not pay: the floor under the overhead benchmark's ratio.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass
from typing import Any

from bench.common import Context, Daemon, Row, build_packages, run_in_child

PHASES = ("to_worker", "in_worker", "to_daemon")
_BUCKET = re.compile(r'^(\w+)_bucket\{le="([^"]+)"(?:,phase="(\w+)")?\} (\S+)$', re.M)


@dataclass(frozen=True)
class Params:
    calls: int
    seconds: float


FULL = Params(calls=5000, seconds=20.0)
SMOKE = Params(calls=50, seconds=5.0)


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    package = build_packages(ctx.workdir / "packages", {"identity": {"kind": "identity"}})["identity"]
    with Daemon(ctx.workdir, 1, env={"DEPLOYD_METRICS_ADDRESS": "127.0.0.1:0"}) as daemon:
        spec = {"target": daemon.target, "package": str(package), "calls": params.calls, "seconds": params.seconds}
        done = run_in_child("bench.hops:sequential_calls", spec, timeout=300 + params.seconds)
        match = re.search(r"metrics on (http://\S+)", daemon.log)
        if match is None:
            raise RuntimeError("the daemon did not say where its metrics are")
        with urllib.request.urlopen(match.group(1), timeout=30) as response:
            histograms = parse_histograms(response.read().decode())
    for name, label in [
        *(("deployd_worker_call_seconds", phase) for phase in PHASES),
        ("deployd_queue_wait_seconds", ""),
    ]:
        buckets = histograms.get((name, label), [])
        p25, p50, p95 = (quantile(buckets, q) * 1000.0 for q in (0.25, 0.5, 0.95))
        strategy = label or "queue_wait"
        ctx.report.add(Row("hops", strategy, 1, int(buckets[-1][1]) if buckets else 0, 0.0, p25, p50, p95))
        ctx.report.line(f"hops: {strategy} p50 {p50 * 1000:.0f} us (p25 {p25 * 1000:.0f}, p95 {p95 * 1000:.0f})")
    ctx.report.line(f"hops: {done['calls']} calls, client-side p50 {done['p50_ms']:.3f} ms")


def parse_histograms(text: str) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(metric, phase label) -> cumulative (upper bound, count) pairs, in order."""
    histograms: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for name, bound, phase, count in _BUCKET.findall(text):
        histograms.setdefault((name, phase), []).append((float(bound), float(count)))
    return histograms


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The q-quantile (seconds), interpolated linearly inside the bucket that holds it."""
    if not buckets or buckets[-1][1] == 0:
        return 0.0
    wanted = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= wanted:
            if bound == float("inf"):
                return lower_bound
            share = (wanted - lower_count) / (count - lower_count) if count > lower_count else 0.0
            return lower_bound + share * (bound - lower_bound)
        lower_bound, lower_count = bound, count
    return lower_bound


def sequential_calls(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: identity calls one at a time, within a count and a time limit."""
    import statistics
    import time

    import torch

    from client import InterpreterManager

    x = torch.arange(16, dtype=torch.float32)
    latencies = []
    with InterpreterManager(spec["target"], timeout=60) as manager:
        model = manager.load_package(spec["package"]).load_pickle("model", "model.pkl")
        deadline = time.monotonic() + spec["seconds"]
        while len(latencies) < spec["calls"] and time.monotonic() < deadline:
            started = time.perf_counter()
            model(x)
            latencies.append(time.perf_counter() - started)
    return {"calls": len(latencies), "p50_ms": statistics.median(latencies) * 1000.0}
