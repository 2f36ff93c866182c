"""Threshold: from what size a tensor is faster through shared memory than inline on the socket.

Two daemons side by side, alike but for `worker.shm_threshold_bytes`: one sends every
tensor through its shared-memory arenas (threshold 1 byte), the other every tensor
inline on the worker's socket (threshold 1 TiB). An identity model returns float32
tensors from 1 KiB to 1 MiB; calls are sequential from one load-generator process,
interleaved per round. The smallest size from which shared memory wins every larger
size too is where the daemon's default threshold belongs.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from bench.bandwidth import size_label
from bench.common import (
    TUNED_MALLOC,
    Context,
    Daemon,
    Samples,
    build_packages,
    interleaved_rounds,
    paired_ratios,
    run_in_child,
    start_daemons,
)

SHARED = "shared-memory"
INLINE = "inline"
THRESHOLDS = {SHARED: 1, INLINE: 1 << 40}
DEFAULT_THRESHOLD = 65536  # server.app.config.WorkerSection.shm_threshold_bytes


@dataclass(frozen=True)
class Params:
    sizes: tuple[int, ...]
    rounds: int
    window_seconds: float
    max_calls: int


FULL = Params(sizes=tuple(1024 << shift for shift in range(0, 11, 2)), rounds=5, window_seconds=1.0, max_calls=2000)
SMOKE = Params(sizes=(1024, 65536), rounds=1, window_seconds=0.2, max_calls=20)


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    package = build_packages(ctx.workdir / "packages", {"identity": {"kind": "identity"}})["identity"]
    with ExitStack() as stack:
        daemons = {
            name: Daemon(ctx.workdir, 1, env={**TUNED_MALLOC, "DEPLOYD_WORKER_SHM_THRESHOLD_BYTES": str(threshold)})
            for name, threshold in THRESHOLDS.items()
        }
        start_daemons(stack, list(daemons.values()))
        spec = {
            "package": str(package),
            "targets": {name: daemon.target for name, daemon in daemons.items()},
            "sizes": params.sizes,
            "rounds": params.rounds,
            "window_seconds": params.window_seconds,
            "max_calls": params.max_calls,
        }
        timeout = 300 + len(params.sizes) * params.rounds * 2 * (params.window_seconds + 30)
        results = run_in_child("bench.threshold:generate_load", spec, timeout)
    report(ctx, params.sizes, results)


def report(ctx: Context, sizes: tuple[int, ...], results: dict[str, Any]) -> None:
    wins: dict[int, float] = {}
    for size in sizes:
        shared, inline = (Samples.from_json(results[str(size)][name]) for name in (SHARED, INLINE))
        benchmark = f"threshold_{size_label(size)}"
        shared_row = ctx.report.add(shared.row(benchmark, SHARED, 1))
        inline_row = ctx.report.add(inline.row(benchmark, INLINE, 1))
        speedups = paired_ratios(inline.p50s(), shared.p50s())
        wins[size] = sorted(speedups)[len(speedups) // 2]
        ctx.report.line(
            f"threshold {size_label(size)}: p50 inline {inline_row.p50_latency:.3f} ms, shared memory"
            f" {shared_row.p50_latency:.3f} ms: shared memory {wins[size]:.2f}x as fast"
        )
    crossover = next((size for size in sizes if all(wins[larger] >= 1.0 for larger in sizes if larger >= size)), None)
    where = size_label(crossover) if crossover is not None else "no size measured"
    ctx.report.line(
        f"threshold: shared memory is as fast or faster from {where} (default {size_label(DEFAULT_THRESHOLD)})"
    )


def generate_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: for each size, rounds of calls on both daemons in turn."""
    import torch

    from client import InterpreterManager

    managers = {name: InterpreterManager(target, timeout=120) for name, target in spec["targets"].items()}
    try:
        models = {
            name: m.load_package(spec["package"]).load_pickle("model", "model.pkl") for name, m in managers.items()
        }
        results = {}
        for size in spec["sizes"]:
            x = torch.rand(size // 4, dtype=torch.float32)
            for model in models.values():
                if not torch.equal(model(x), x):
                    raise AssertionError("a round trip changed the data")
            calls = {name: (lambda model=model, x=x: model(x)) for name, model in models.items()}
            results[str(size)] = interleaved_rounds(calls, spec["rounds"], spec["window_seconds"], spec["max_calls"])
        return results
    finally:
        for manager in managers.values():
            manager.close()
