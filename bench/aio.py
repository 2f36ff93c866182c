"""aio: one asyncio client (client.aio) against the blocking client, same daemon, same run.

One real daemon (2 workers) serves the seed model (scripts/export_seed.py: two convolutions)
by name from its config's `models:`. One load-generator process calls it with the same
1x1x10x10 float32 input (uniform [0, 1) from a fixed seed) in two ways:

- sync: `client.InterpreterManager`, one manager (one channel) shared by N threads, each
  calling `manager.model("seed")(x)` back to back (bench.common.threaded_window);
- aio: `client.aio.AsyncInterpreterManager`, one manager (one channel) on one asyncio event
  loop (asyncio's own, as `asyncio.run` gives), N tasks each awaiting `model(x)` back to back
  (bench.v2load.closed_loop); the loop and the manager live for the whole run
  (asyncio.Runner), so every aio window uses the same channel;

at N = 8 and 32 calls in flight, in interleaved rounds (the order of the two flips every
round), every window after an uncounted warm-up window, each bounded by time and calls. First
the aio answer must equal the sync answer bit for bit.

Printed per N: calls/s (answered calls / the window's wall time), p50 and p99 of both, aio /
sync for calls/s and p50 (the median over rounds of the ratio within a round, and its range);
CPU time per call over the measured windows of the load generator (this process, all its
threads: time.process_time around each window, so each phase is measured alone), of the
daemon and of its workers (/proc/PID/stat); and failed calls of each (target 0). Both
clients share the 2 cores with the daemon and its workers, so a client's own CPU per call
moves its calls/s.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import Context, Samples, paired_ratios, percentile, ratio, run_in_child, threaded_window
from bench.v2load import SeedDaemon, closed_loop, cpu_seconds, export_seed, spread
from server.pool.procinfo import descendants_of

BENCHMARK = "aio_seed"
SYNC = "sync"
AIO = "aio"
STRATEGIES = (SYNC, AIO)
MODEL = "seed"
SHAPE = (1, 1, 10, 10)
WORKERS = 2
CALL_TIMEOUT_S = 60.0  # each call's deadline (both managers' timeout)
CPU_KEYS = ("client_s", "daemon_s", "workers_s", "calls", "failed")


@dataclass(frozen=True)
class Params:
    levels: tuple[int, ...]  # calls in flight: threads (sync) or tasks (aio)
    rounds: int
    window_seconds: float
    warmup_seconds: float  # before every measured window, uncounted
    max_calls: int  # per window, all callers together


FULL = Params(levels=(8, 32), rounds=5, window_seconds=2.0, warmup_seconds=0.3, max_calls=50000)
SMOKE = Params(levels=(8, 32), rounds=1, window_seconds=0.3, warmup_seconds=0.1, max_calls=300)


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    package = export_seed(ctx.workdir / "packages")
    with SeedDaemon(ctx.workdir, WORKERS, package) as daemon:
        spec = {"target": daemon.target, "daemon_pid": daemon.pid, **asdict(params)}
        windows = params.rounds * len(params.levels) * 2
        window = params.window_seconds + params.warmup_seconds
        result = run_in_child("bench.aio:side_by_side_load", spec, 300 + windows * (window + 30))
    report(ctx, result, params)


def report(ctx: Context, result: dict[str, Any], params: Params) -> None:
    ctx.report.line(
        f"aio: {MODEL} ({'x'.join(map(str, SHAPE))} float32), {WORKERS} workers, one load generator: the aio"
        " client's answer equals the sync client's bit for bit"
    )
    for level in params.levels:
        samples = {strategy: Samples.from_json(result["samples"][strategy][str(level)]) for strategy in STRATEGIES}
        rows = {strategy: ctx.report.add(samples[strategy].row(BENCHMARK, strategy, level)) for strategy in STRATEGIES}
        figures = "; ".join(
            f"{strategy} {rows[strategy].work_items_per_second:.0f}/s, p50 {rows[strategy].p50_latency:.3f} ms,"
            f" p99 {percentile(samples[strategy].latencies, 99) * 1000:.3f} ms"
            for strategy in STRATEGIES
        )
        rates = paired_ratios(samples[AIO].rates(), samples[SYNC].rates())
        p50s = paired_ratios(samples[AIO].p50s(), samples[SYNC].p50s())
        ctx.report.line(
            f"aio: {level} in flight: {figures}; aio/sync calls/s {spread(rates)}, p50 {spread(p50s)} (no target)"
        )
        cpu = {strategy: result["cpu"][strategy][str(level)] for strategy in STRATEGIES}
        per_call = {
            strategy: {key: ratio(used[key], used["calls"]) * 1e6 for key in ("client_s", "daemon_s", "workers_s")}
            for strategy, used in cpu.items()
        }
        text = "; ".join(
            f"{strategy}: load generator {per_call[strategy]['client_s']:.0f} us,"
            f" daemon {per_call[strategy]['daemon_s']:.0f} us, workers {per_call[strategy]['workers_s']:.0f} us"
            for strategy in STRATEGIES
        )
        client_ratio = ratio(per_call[AIO]["client_s"], per_call[SYNC]["client_s"])
        ctx.report.line(
            f"aio: {level} in flight, CPU per call: {text} (load generator aio/sync {client_ratio:.2f}x);"
            f" failed calls sync {cpu[SYNC]['failed']:.0f}, aio {cpu[AIO]['failed']:.0f}"
        )
    for message in result["first_errors"]:
        ctx.report.line(f"aio: a failed call: {message}")
    failed = sum(used["failed"] for by_level in result["cpu"].values() for used in by_level.values())
    ctx.report.check("aio: calls failed (sync and aio)", failed, "<=", 0, "calls")


# ---------------------------------------------------------------------------- load generator (child)


def side_by_side_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Both clients against the seed model, in interleaved rounds at each level. Returns Samples as JSON."""
    import torch

    from client import InterpreterManager
    from client.aio import AsyncInterpreterManager

    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
    target, daemon_pid, max_calls = spec["target"], spec["daemon_pid"], spec["max_calls"]
    levels = spec["levels"]
    samples = {strategy: {level: Samples() for level in levels} for strategy in STRATEGIES}
    cpu = {strategy: {level: dict.fromkeys(CPU_KEYS, 0.0) for level in levels} for strategy in STRATEGIES}
    first_errors: list[str] = []

    async def open_aio() -> Any:  # grpc.aio: the channel is made in the loop that uses it
        return AsyncInterpreterManager(target, timeout=CALL_TIMEOUT_S)

    with InterpreterManager(target, timeout=CALL_TIMEOUT_S) as manager, asyncio.Runner() as runner:
        aio_manager = runner.run(open_aio())
        try:
            sync_model, aio_model = manager.model(MODEL), aio_manager.model(MODEL)
            expected, answer = sync_model(x), runner.run(aio_model(x))
            if not torch.equal(expected, answer):
                raise AssertionError(f"the aio client's answer differs from the sync client's: {answer} vs {expected}")

            def sync_window(level: int, seconds: float) -> tuple[list[float], float, int, str]:
                """N threads on the one blocking manager; latencies of the calls that answered."""
                answered: list[float] = []
                failures: list[str] = []

                def call() -> None:
                    started = time.perf_counter()
                    try:
                        sync_model(x)
                    except Exception as error:  # counted, not fatal
                        failures.append(f"{type(error).__name__}: {error}")
                        return
                    answered.append(time.perf_counter() - started)

                _, elapsed = threaded_window(call, level, seconds, max(1, max_calls // level))
                return answered, elapsed, len(failures), failures[0] if failures else ""

            def aio_window(level: int, seconds: float) -> tuple[list[float], float, int, str]:
                """N tasks on the one asyncio manager."""
                result = runner.run(closed_loop(lambda: aio_model(x), level, seconds, max_calls, CALL_TIMEOUT_S))
                return result.latencies_s, result.seconds, result.errors, result.first_error

            windows = {SYNC: sync_window, AIO: aio_window}
            for round_index in range(spec["rounds"]):
                for level in levels:
                    for strategy in STRATEGIES if round_index % 2 == 0 else STRATEGIES[::-1]:
                        window = windows[strategy]
                        window(level, spec["warmup_seconds"])
                        workers = sorted(descendants_of(daemon_pid))
                        daemon_cpu, workers_cpu = cpu_seconds([daemon_pid]), cpu_seconds(workers)
                        client_cpu = time.process_time()
                        latencies, elapsed, failed, first_error = window(level, spec["window_seconds"])
                        used = cpu[strategy][level]
                        used["client_s"] += time.process_time() - client_cpu
                        used["daemon_s"] += cpu_seconds([daemon_pid]) - daemon_cpu
                        used["workers_s"] += cpu_seconds(workers) - workers_cpu
                        used["calls"] += len(latencies) + failed
                        used["failed"] += failed
                        if failed and len(first_errors) < 3:
                            first_errors.append(f"{strategy}, {level} in flight: {first_error} ({failed} failed)")
                        samples[strategy][level].add(latencies, elapsed)
        finally:
            runner.run(aio_manager.close())
    return {
        "samples": {
            strategy: {str(level): collected.to_json() for level, collected in samples[strategy].items()}
            for strategy in STRATEGIES
        },
        "cpu": {strategy: {str(level): used for level, used in cpu[strategy].items()} for strategy in STRATEGIES},
        "first_errors": first_errors,
    }
