"""Models by name: what a name costs a call, and what a hot swap costs the callers.

One daemon with a worker per core serves both parts, each measured from a load-generator
process of its own.

- By name vs by id: an identity model on a 16-element float32 tensor, loaded twice from
  one package, once anonymously (called by its object id) and once as a name (called by
  the name, which the daemon resolves on every call). Sequential calls in interleaved
  rounds; the ratio is name p50 / id p50, the median over rounds of the ratio within a
  round (target <= 1.05).
- Hot swap under load: CALLERS threads call `tag()` of a name back to back while it is
  swapped `swaps` times between two packages whose models answer "a" and "b", one swap
  every `calm_seconds`. Printed: calls/s in the `window_ms` from each load_pickle(name=)
  call against the `window_ms` just before it (median over swaps of the ratio; no target:
  the load runs on the same two cores as the calls), and calls/s during the load call
  itself, from its start to its return; failed calls (target 0), stale answers
  (a call begun after the load returned that answered with the old tag: target 0), and
  per swap the load's duration and the time from the load call to the first answer of
  the new version (p50 and the slowest).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import (
    Context,
    Daemon,
    Row,
    Samples,
    build_packages,
    interleaved_rounds,
    paired_ratios,
    percentile,
    ratio,
    run_in_child,
    timed_calls,
)

ELEMENTS = 16
CALLERS = 8
NAME = "names-bench"
BY_ID = "by-id"
BY_NAME = "by-name"
TAGS = ("a", "b")


@dataclass(frozen=True)
class Params:
    rounds: int  # by name vs by id
    window_seconds: float
    max_calls: int  # per window and strategy
    swaps: int  # hot swap under load
    calm_seconds: float  # between swaps
    window_ms: float  # compared before and from each swap


FULL = Params(rounds=7, window_seconds=1.5, max_calls=50000, swaps=20, calm_seconds=1.0, window_ms=250)
SMOKE = Params(rounds=1, window_seconds=0.3, max_calls=100, swaps=2, calm_seconds=0.3, window_ms=100)


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    specs = {"identity": {"kind": "identity"}} | {f"tag_{tag}": {"kind": "tagged", "label": tag} for tag in TAGS}
    packages = {name: str(path) for name, path in build_packages(ctx.workdir / "packages", specs).items()}
    with Daemon(ctx.workdir, ctx.cpu_count) as daemon:
        spec = {"target": daemon.target, "packages": packages, **asdict(params)}
        timeout = 300 + params.rounds * 2 * (params.window_seconds + 30)
        by_name = run_in_child("bench.names:name_and_id_load", spec, timeout)
        swapping = run_in_child("bench.names:swap_load", spec, 300 + params.swaps * (params.calm_seconds + 30))
    # The same swaps on the direct path: the callers call the workers' own ports, which resolve
    # the name from the table the daemon sends them.
    with Daemon(ctx.workdir, ctx.cpu_count, env={"DEPLOYD_POOL_DATA_PORTS": "0"}) as daemon:
        spec = {"target": daemon.target, "packages": packages, **asdict(params)}
        direct = run_in_child("bench.names:swap_load", spec, 300 + params.swaps * (params.calm_seconds + 30))
    report_by_name(ctx, by_name)
    report_swaps(ctx, swapping, params)
    report_swaps(ctx, direct, params, path="direct")


def report_by_name(ctx: Context, results: dict[str, Any]) -> None:
    by_id, by_name = (Samples.from_json(results[strategy]) for strategy in (BY_ID, BY_NAME))
    id_row = ctx.report.add(by_id.row("names_invoke", BY_ID, 1))
    name_row = ctx.report.add(by_name.row("names_invoke", BY_NAME, 1))
    what = f"names: sequential p50 by name {name_row.p50_latency:.3f} ms / by id {id_row.p50_latency:.3f} ms"
    ctx.report.check(what, paired_ratios(by_name.p50s(), by_id.p50s()), "<=", 1.05)


def report_swaps(ctx: Context, result: dict[str, Any], params: Params, path: str = "") -> None:
    """path: "" through the daemon, "direct" on the workers' data ports."""
    before, after, loading = result["before"], result["after"], result["loading"]
    benchmark = f"names_swap_{path}" if path else "names_swap"
    label = f"names ({path})" if path else "names"
    ms = f"{params.window_ms:g} ms"
    span = f"{params.window_ms:g}ms"
    ctx.report.add(windows_row(benchmark, f"before-{span}", before))
    ctx.report.add(windows_row(benchmark, f"from-load-{span}", after))
    ctx.report.add(windows_row(benchmark, "during-load", loading))
    rates = paired_ratios([rate(window) for window in after], [rate(window) for window in before])
    loaded_for = sum(window["seconds"] for window in loading)
    during_load = ratio(sum(len(window["latencies"]) for window in loading), loaded_for)
    ctx.report.line(
        f"{label}: {CALLERS} callers, {len(after)} hot swaps: calls/s in the {ms} from the load call / the {ms}"
        f" before = {statistics.median(rates):.2f}x (median of {len(rates)} swaps, {min(rates):.2f}-{max(rates):.2f};"
        f" no target); during the load call itself {during_load:.0f} calls/s against"
        f" {statistics.median(rate(window) for window in before):.0f} calls/s before;"
        f" slowest call from the load {max((max(w['latencies'], default=0) for w in after), default=0) * 1000:.0f} ms;"
        f" {result['calls']} calls in all"
    )
    for failure in result["failures"][:3]:
        ctx.report.line(f"{label}: a failed call: {failure}")
    ctx.report.check(f"{label}: calls failed during hot swaps", result["failed"], "<=", 0, "calls")
    ctx.report.check(
        f"{label}: stale answers (begun after the load returned, old tag)", result["stale"], "<=", 0, "calls"
    )
    loads = [window["seconds"] * 1000 for window in loading]
    serving = [ms for ms in result["to_serving_ms"] if ms is not None]
    ctx.report.line(
        f"{label}: load_pickle(name=) under load took {percentile(loads, 50):.1f} ms p50, {max(loads):.1f} ms slowest;"
        f" from the load call to the new version's first answer {percentile(serving, 50):.1f} ms p50,"
        f" {max(serving, default=float('nan')):.1f} ms slowest ({len(serving)} of {params.swaps} swaps seen answering)"
    )


def rate(window: dict[str, Any]) -> float:
    return ratio(len(window["latencies"]), window["seconds"])


def windows_row(benchmark: str, strategy: str, windows: list[dict[str, Any]]) -> Row:
    latencies = [latency for window in windows for latency in window["latencies"]]
    return Row.from_samples(benchmark, strategy, CALLERS, latencies, sum(window["seconds"] for window in windows))


# ---------------------------------------------------------------------------- load generators (children)


def name_and_id_load(spec: dict[str, Any]) -> dict[str, Any]:
    """One call at a time, the same model by its object id and by a name, in interleaved rounds."""
    import torch

    from client import InterpreterManager

    x = torch.arange(ELEMENTS, dtype=torch.float32)
    with InterpreterManager(spec["target"], timeout=60) as manager:
        package = manager.load_package(spec["packages"]["identity"])
        by_id = package.load_pickle("model", "model.pkl")
        package.load_pickle("model", "model.pkl", name=NAME)
        by_name = manager.model(NAME)
        calls = {BY_ID: lambda: by_id(x), BY_NAME: lambda: by_name(x)}
        for call in calls.values():
            if not torch.equal(call(), x):
                raise AssertionError("a round trip changed the data")
            timed_calls(call, 0.5, 200)  # warm-up
        results = interleaved_rounds(calls, spec["rounds"], spec["window_seconds"], spec["max_calls"])
        package.unload()
    return results


@dataclass
class Call:
    started: float
    finished: float
    tag: str  # "" if it failed


def swap_load(spec: dict[str, Any]) -> dict[str, Any]:
    """CALLERS threads call the name; calm windows and swaps alternate. Returns every window's calls."""
    from client import InterpreterManager

    with InterpreterManager(spec["target"], timeout=60) as manager:
        packages = {tag: manager.load_package(spec["packages"][f"tag_{tag}"]) for tag in TAGS}
        packages["a"].load_pickle("model", "model.pkl", name=NAME)
        model = manager.model(NAME)
        if model.call_method("tag") != "a":  # also imports what the first call needs, before the threads
            raise AssertionError("the name does not answer with its first version's tag")
        calls: list[list[Call]] = [[] for _ in range(CALLERS)]
        failures: list[str] = []
        stop = threading.Event()
        deadline = time.monotonic() + 120 + spec["swaps"] * (spec["calm_seconds"] + 10)

        def caller(index: int) -> None:
            while not stop.is_set() and time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    tag = model.call_method("tag")
                except Exception as error:
                    failures.append(f"{type(error).__name__}: {error}")
                    tag = ""
                calls[index].append(Call(started, time.perf_counter(), tag))

        threads = [threading.Thread(target=caller, args=(index,), daemon=True) for index in range(CALLERS)]
        for thread in threads:
            thread.start()
        swaps: list[tuple[float, float, str]] = []  # load called, load returned, the new version's tag
        try:
            time.sleep(max(spec["calm_seconds"], 1.0))  # warm-up
            for swap in range(spec["swaps"]):
                time.sleep(spec["calm_seconds"])
                tag = TAGS[(swap + 1) % 2]
                load_called = time.perf_counter()
                loaded = packages[tag].load_pickle("model", "model.pkl", name=NAME)
                swaps.append((load_called, time.perf_counter(), tag))
                if loaded.version != swap + 2:
                    raise AssertionError(f"swap {swap} made version {loaded.version}, not {swap + 2}")
            time.sleep(spec["calm_seconds"])
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        for package in packages.values():
            package.unload()
    finished = sorted((call for per_caller in calls for call in per_caller), key=lambda call: call.finished)
    return swap_windows(finished, swaps, spec["window_ms"] / 1000) | {
        "failed": len(failures),
        "failures": failures[:10],
    }


def swap_windows(calls: list[Call], swaps: list[tuple[float, float, str]], seconds: float) -> dict[str, Any]:
    """Per swap, the calls that finished in the window before it, in the window from its load
    call, and during the load call; stale answers; the time from the load call to the first
    answer with the new tag."""
    before, after, loading, to_serving_ms = [], [], [], []
    stale = 0
    for index, (load_called, load_returned, tag) in enumerate(swaps):
        before.append(window(calls, load_called - seconds, load_called))
        after.append(window(calls, load_called, load_called + seconds))
        loading.append(window(calls, load_called, load_returned))
        next_swap = swaps[index + 1][0] if index + 1 < len(swaps) else float("inf")
        answered = [call.finished for call in calls if call.tag == tag and load_called <= call.finished < next_swap]
        to_serving_ms.append((min(answered) - load_called) * 1000 if answered else None)
        stale += sum(
            1
            for call in calls
            if load_returned <= call.started and call.finished < next_swap and call.tag not in (tag, "")
        )
    return {
        "before": before,
        "after": after,
        "loading": loading,
        "to_serving_ms": to_serving_ms,
        "stale": stale,
        "calls": len(calls),
    }


def window(calls: list[Call], start: float, end: float) -> dict[str, Any]:
    return {
        "seconds": end - start,
        "latencies": [call.finished - call.started for call in calls if start <= call.finished < end],
    }
