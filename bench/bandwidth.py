"""Bandwidth: how fast big tensors go through deployd, against a bare gRPC echo of the same bytes.

An identity model returns a float32 tensor of 1, 16 or 64 MiB; every byte crosses the
client -> daemon -> worker path and back. The baseline is bench.echo returning the same
bytes as a bytes field. Both servers get the same environment, with glibc malloc tuned
(TUNED_MALLOC) so that big buffers are not page-faulted afresh on every call, which
otherwise dominates at these sizes (see ../shared/limits/README.md, section 0).

Calls are sequential, from the public client (`obj(x)`) and a sync echo stub, in one
load-generator process, interleaved per round. MB/s = payload bytes (one way, MB = 10^6
bytes) / p50 latency. The ratio is the median over rounds of echo p50 / deployd p50 within
a round. Target: deployd >= 0.7x the echo's MB/s at every size.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from bench.common import (
    MIB,
    TUNED_MALLOC,
    Context,
    Daemon,
    Samples,
    build_packages,
    interleaved_rounds,
    paired_ratios,
    ratio,
    run_in_child,
)
from bench.echo import CHANNEL_OPTIONS, Blob, EchoServer, echo_method

DEPLOYD = "deployd"
ECHO = "grpc-echo"


@dataclass(frozen=True)
class Params:
    sizes: tuple[tuple[int, int], ...]  # (payload bytes, calls per round and strategy)
    rounds: int
    window_seconds: float  # a round of one size and strategy stops after this, whatever the count


FULL = Params(sizes=((1 * MIB, 20), (16 * MIB, 5), (64 * MIB, 2)), rounds=5, window_seconds=10.0)
SMOKE = Params(sizes=((64 * 1024, 3), (256 * 1024, 3)), rounds=1, window_seconds=1.0)


def size_label(size: int) -> str:
    return f"{size // MIB}MiB" if size % MIB == 0 else f"{size // 1024}KiB"


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    package = build_packages(ctx.workdir / "packages", {"identity": {"kind": "identity"}})["identity"]
    with ExitStack() as stack:
        daemon = stack.enter_context(Daemon(ctx.workdir, ctx.cpu_count, env=TUNED_MALLOC))
        echo = stack.enter_context(EchoServer(env=TUNED_MALLOC))
        spec = {
            "package": str(package),
            "deployd": daemon.target,
            "echo": echo.target,
            "sizes": params.sizes,
            "rounds": params.rounds,
            "window_seconds": params.window_seconds,
        }
        timeout = 300 + len(params.sizes) * params.rounds * 2 * (params.window_seconds + 60)
        results = run_in_child("bench.bandwidth:generate_load", spec, timeout)
    for size, _ in params.sizes:
        report(ctx, size, results[str(size)])


def report(ctx: Context, size: int, results: dict[str, Any]) -> None:
    """Rows for both strategies; the ratio is the median over rounds of echo p50 / deployd p50."""
    deployd, echo = (Samples.from_json(results[strategy]) for strategy in (DEPLOYD, ECHO))
    benchmark = f"bandwidth_{size_label(size)}"
    deployd_row = ctx.report.add(deployd.row(benchmark, DEPLOYD, 1))
    echo_row = ctx.report.add(echo.row(benchmark, ECHO, 1))
    deployd_rate, echo_rate = (megabytes_per_second(size, row.p50_latency / 1000.0) for row in (deployd_row, echo_row))
    what = f"bandwidth {size_label(size)}: deployd {deployd_rate:.0f} MB/s / echo {echo_rate:.0f} MB/s"
    ctx.report.check(what, paired_ratios(echo.p50s(), deployd.p50s()), ">=", 0.7)


def megabytes_per_second(size: int, seconds: float) -> float:
    return ratio(size / 1e6, seconds)


# ---------------------------------------------------------------------------- load generator (child)


def generate_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: for each size, rounds of deployd then echo calls."""
    import grpc
    import torch

    from client import InterpreterManager

    results = {}
    with InterpreterManager(spec["deployd"], timeout=300) as manager:
        model = manager.load_package(spec["package"]).load_pickle("model", "model.pkl")
        with grpc.insecure_channel(spec["echo"], options=CHANNEL_OPTIONS) as channel:
            echo = echo_method(channel)
            for size, calls_per_round in spec["sizes"]:
                x = torch.rand(size // 4, dtype=torch.float32)
                calls = round_trips(model, echo, x)
                results[str(size)] = interleaved_rounds(calls, spec["rounds"], spec["window_seconds"], calls_per_round)
    return results


def round_trips(model: Any, echo: Any, x: Any) -> dict[str, Any]:
    """The two calls for one tensor, each checked once for a faithful round trip."""
    import torch

    payload = x.numpy().tobytes()
    if not torch.equal(model(x), x) or echo(Blob(data=payload), timeout=300).data != payload:
        raise AssertionError("a round trip changed the data")

    def call_deployd() -> None:
        if model(x).numel() != x.numel():
            raise AssertionError("deployd returned a tensor of another size")

    def call_echo() -> None:
        if len(echo(Blob(data=payload), timeout=300).data) != len(payload):
            raise AssertionError("the echo returned another size")

    return {DEPLOYD: call_deployd, ECHO: call_echo}
