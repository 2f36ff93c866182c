"""Scaling: does adding workers add throughput for a model that holds the GIL?

The model (bench.models.PyLoop) is a Python loop of tiny tensor ops, about 10 ms a
call: torch releases the GIL only briefly around each op, so threads in one interpreter
convoy on it. This is the case torch::deploy exists for. Measured side by side:

- in-process-threads, 1 thread: the model called directly in the load generator, under
  torch.no_grad() and with one torch thread, as a worker runs it;
- in-process-threads, N threads: N threads sharing one interpreter and its GIL;
- deployd with 1..N workers (N = os.cpu_count()), each driven by as many client threads
  as it has workers, so every worker has one call at a time.

All strategies run in one load-generator process, in interleaved rounds, so host noise
hits them alike; each ratio is the median over rounds of the ratio within a round.
Target: N workers >= 0.9 x N times one worker.
"""

from __future__ import annotations

import statistics
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import (
    Context,
    Daemon,
    Samples,
    build_packages,
    paired_ratios,
    run_in_child,
    start_daemons,
    threaded_window,
    workers_text,
)

BENCHMARK = "scaling_pyloop"
LOCAL = "in-process-threads"
DEPLOYD = "deployd"


@dataclass(frozen=True)
class Params:
    iterations: int  # loop rounds per call: 2400 is about 10 ms on this machine
    rounds: int
    window_seconds: float
    max_calls_per_thread: int


FULL = Params(iterations=2400, rounds=5, window_seconds=3.0, max_calls_per_thread=2000)
SMOKE = Params(iterations=50, rounds=1, window_seconds=0.3, max_calls_per_thread=200)


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    n = ctx.cpu_count
    package = build_packages(ctx.workdir / "packages", {"pyloop": {"kind": "pyloop", "iterations": params.iterations}})
    strategies: list[dict[str, Any]] = [{"strategy": LOCAL, "n": count} for count in sorted({1, n})]
    with ExitStack() as stack:
        daemons = [Daemon(ctx.workdir, workers) for workers in range(1, n + 1)]
        for daemon in start_daemons(stack, daemons):
            strategies.append({"strategy": DEPLOYD, "n": daemon.workers, "target": daemon.target})
        spec = {"package": str(package["pyloop"]), "strategies": strategies, **asdict(params)}
        timeout = 300 + params.rounds * len(strategies) * (params.window_seconds + 30)
        results = run_in_child("bench.scaling:generate_load", spec, timeout)
    samples = {(result["strategy"], result["n"]): Samples.from_json(result["samples"]) for result in results}
    for (strategy, count), collected in samples.items():
        ctx.report.add(collected.row(BENCHMARK, strategy, count))
    report_ratios(ctx, {key: collected.rates() for key, collected in samples.items()}, n)


def report_ratios(ctx: Context, rates: dict[tuple[str, int], list[float]], n: int) -> None:
    """Each ratio is the median over rounds of the ratio within a round."""
    workers = workers_text(n)
    pool, one_worker = rates[(DEPLOYD, n)], rates[(DEPLOYD, 1)]
    threads, one_thread = rates[(LOCAL, n)], rates[(LOCAL, 1)]
    ctx.report.check(f"scaling: {workers} / 1 worker", paired_ratios(pool, one_worker), ">=", 0.9 * n)
    median = statistics.median
    ctx.report.line(
        f"scaling: {n} threads in one interpreter / 1 thread = {median(paired_ratios(threads, one_thread)):.2f}x"
        " (one GIL: for reference)"
    )
    ctx.report.line(
        f"scaling: {workers} / {n} threads in one interpreter = {median(paired_ratios(pool, threads)):.2f}x"
    )
    ctx.report.line(
        f"scaling: 1 worker / 1 in-process thread = {median(paired_ratios(one_worker, one_thread)):.2f}x"
        " (the cost of the remote call)"
    )


# ---------------------------------------------------------------------------- load generator (child)


def generate_load(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs in its own process: every strategy, in interleaved rounds of one window each."""
    import torch
    from torch.package import PackageImporter

    from client import InterpreterManager

    torch.set_num_threads(1)  # as in every worker
    x = torch.ones(1, 16)
    model = PackageImporter(spec["package"]).load_pickle("model", "model.pkl")

    def local(x: Any) -> Any:
        with torch.no_grad():  # as workers run calls; per thread, so inside the call
            return model(x)

    expected = local(x)
    managers: list[InterpreterManager] = []
    try:
        calls = []
        for strategy in spec["strategies"]:
            if strategy["strategy"] == LOCAL:
                calls.append(local)
                continue
            manager = InterpreterManager(strategy["target"], timeout=120)
            managers.append(manager)
            remote = manager.load_package(spec["package"]).load_pickle("model", "model.pkl")
            if not torch.equal(remote(x), expected):
                raise AssertionError("deployd's result differs from the local model's")
            calls.append(remote)
        return measure_rounds(spec, calls, x)
    finally:
        for manager in managers:
            manager.close()


def measure_rounds(spec: dict[str, Any], calls: list[Any], x: Any) -> list[dict[str, Any]]:
    strategies = spec["strategies"]
    samples = [Samples() for _ in strategies]
    for strategy, model in zip(strategies, calls, strict=True):  # warm-up: every thread, a few calls
        threaded_window(lambda model=model: model(x), strategy["n"], 0.2, 3)
    for _ in range(spec["rounds"]):
        for strategy, model, collected in zip(strategies, calls, samples, strict=True):
            latencies, elapsed = threaded_window(
                lambda model=model: model(x), strategy["n"], spec["window_seconds"], spec["max_calls_per_thread"]
            )
            collected.add(latencies, elapsed)
    return [
        {"strategy": strategy["strategy"], "n": strategy["n"], "samples": collected.to_json()}
        for strategy, collected in zip(strategies, samples, strict=True)
    ]
