"""Warmup: a model's first call, with and without `warmup:` in its config entry.

The model (bench.models.LazyInit) waits `init_ms` on its first call in each worker process: a
lazy init, as a model that picks kernels, fills a cache or compiles code on first use. Two
daemons serve it by name from the same package, one with `warmup: {inputs: ["ones:1,16"]}` and
one without; a fresh client times its first call on each, then `steady_calls` more (the warm
reference). Each round starts both daemons afresh; the ratio is first call without warmup over
first call with it, per round. The warmup's price is paid at start: the time each daemon took
to serve is printed beside it.
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from bench.common import Context, Daemon, Row, build_packages, paired_ratios, percentile, run_in_child

COLD = "deployd-first-call-cold"
WARM = "deployd-first-call-warmup"
_INPUT = "ones:1,16"


@dataclass(frozen=True)
class Params:
    rounds: int  # pairs of fresh daemons
    init_ms: float  # the model's lazy init
    steady_calls: int  # calls after the first, for the warm reference


FULL = Params(rounds=5, init_ms=1000.0, steady_calls=50)
SMOKE = Params(rounds=1, init_ms=200.0, steady_calls=3)


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    packages = ctx.workdir / "warmup-packages"
    build_packages(packages, {"lazy": {"kind": "lazy", "init_ms": params.init_ms}})
    results: dict[str, list[dict[str, Any]]] = {COLD: [], WARM: []}
    for _ in range(params.rounds):
        for strategy, result in first_calls_on_fresh_daemons(ctx, params, packages).items():
            results[strategy].append(result)
    for strategy, rounds in results.items():
        firsts = [result["first"] for result in rounds]
        ctx.report.add(Row.from_samples("warmup", strategy, 1, firsts, sum(firsts)))
    report(ctx, params, results)


def first_calls_on_fresh_daemons(ctx: Context, params: Params, packages: Any) -> dict[str, dict[str, Any]]:
    """Start both daemons (one worker each) side by side, then time a fresh client's calls on each."""
    entry = {"name": "lazy", "package": "lazy.pt", "pickle": "model:model.pkl"}
    warmed = {**entry, "warmup": {"inputs": [_INPUT]}}
    daemons = {
        COLD: Daemon(ctx.workdir, 1, config={"packages": {"directory": str(packages)}, "models": [entry]}),
        WARM: Daemon(ctx.workdir, 1, config={"packages": {"directory": str(packages)}, "models": [warmed]}),
    }
    results: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        for strategy, daemon in daemons.items():
            stack.callback(daemon.stop)
            started = time.monotonic()
            daemon.launch()
            daemon.wait_serving()
            serving = time.monotonic() - started
            results[strategy] = {"serving": serving}
        for strategy, daemon in daemons.items():
            spec = {"target": daemon.target, "steady_calls": params.steady_calls}
            results[strategy].update(run_in_child("bench.warmup:time_calls", spec, timeout=120))
    return results


def report(ctx: Context, params: Params, results: dict[str, list[dict[str, Any]]]) -> None:
    cold = [result["first"] for result in results[COLD]]
    warm = [result["first"] for result in results[WARM]]
    steady = [result["steady_p50"] for result in results[COLD] + results[WARM]]

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.1f} ms"

    ctx.report.line(
        f"warmup: first call without warmup {ms(cold)}, with warmup {ms(warm)} (model's lazy init"
        f" {params.init_ms:g} ms; warm calls p50 {percentile(steady, 50) * 1000:.1f} ms)"
    )
    ctx.report.line(
        f"warmup: start to serving without warmup {ms([r['serving'] for r in results[COLD]])},"
        f" with warmup {ms([r['serving'] for r in results[WARM]])} (the init moves to the start)"
    )
    ctx.report.check("warmup: first call without / with warmup", paired_ratios(cold, warm), ">=", 2.0)


# ---------------------------------------------------------------------------- client (child)


def time_calls(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: a fresh connection's first call, then steady_calls more."""
    import torch

    from client import InterpreterManager

    x = torch.ones(1, 16)
    with InterpreterManager(spec["target"], timeout=60) as manager:
        manager.status()  # the connection is up before the clock starts
        model = manager.model("lazy")
        started = time.perf_counter()
        model(x)
        first = time.perf_counter() - started
        steady = []
        for _ in range(spec["steady_calls"]):
            started = time.perf_counter()
            model(x)
            steady.append(time.perf_counter() - started)
    return {"first": first, "steady_p50": percentile(steady, 50)}
