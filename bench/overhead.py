"""Overhead: what deployd adds to a small call, against a bare gRPC echo of the same bytes.

deployd's Invoke of an identity model on a 16-element float32 tensor does the least model
work there is, so its latency is the cost of the daemon: protobuf <-> values, routing to a
worker, the socket hop there and back. The baseline is bench.echo, a grpc.aio server in
its own process that returns the same 64 bytes as a bytes field. Measured side by side,
in interleaved rounds, from load-generator processes:

- sequential calls (one in flight) from the public client, `obj(x)`, against a sync echo
  stub: p50 latency ratio, target <= 1.3x;
- 32 calls in flight from a grpc.aio client, each strategy sending one prebuilt request
  over and over, so the client does no conversion per call: throughput ratio, target
  >= 0.7x.

Each ratio is the median over rounds of the ratio within a round.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import (
    Context,
    Daemon,
    Samples,
    build_packages,
    interleaved_rounds,
    paired_ratios,
    run_in_child,
    timed_calls,
)
from bench.echo import CHANNEL_OPTIONS, Blob, EchoServer, echo_method

ELEMENTS = 16
IN_FLIGHT = 32
DEPLOYD = "deployd"
ECHO = "grpc-echo"


@dataclass(frozen=True)
class Params:
    rounds: int
    window_seconds: float
    max_calls: int  # per window and strategy


FULL = Params(rounds=5, window_seconds=2.0, max_calls=50000)
SMOKE = Params(rounds=1, window_seconds=0.3, max_calls=100)


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    package = build_packages(ctx.workdir / "packages", {"identity": {"kind": "identity"}})["identity"]
    with ExitStack() as stack:
        daemon = stack.enter_context(Daemon(ctx.workdir, ctx.cpu_count))
        echo = stack.enter_context(EchoServer())
        spec = {"package": str(package), "deployd": daemon.target, "echo": echo.target, **asdict(params)}
        timeout = 300 + params.rounds * 2 * (params.window_seconds + 30)
        sequential = run_in_child("bench.overhead:sequential_load", spec, timeout)
        concurrent = run_in_child("bench.overhead:in_flight_load", spec, timeout)
    report(ctx, "overhead_sequential", 1, sequential)
    report(ctx, f"overhead_in_flight_{IN_FLIGHT}", IN_FLIGHT, concurrent)


def report(ctx: Context, benchmark: str, n_threads: int, results: dict[str, Any]) -> None:
    """Rows for both strategies; the ratio is the median over rounds of the ratio within a round."""
    deployd, echo = (Samples.from_json(results[strategy]) for strategy in (DEPLOYD, ECHO))
    deployd_row = ctx.report.add(deployd.row(benchmark, DEPLOYD, n_threads))
    echo_row = ctx.report.add(echo.row(benchmark, ECHO, n_threads))
    if n_threads == 1:
        what = f"overhead: sequential p50 deployd {deployd_row.p50_latency:.3f} ms / echo {echo_row.p50_latency:.3f} ms"
        ctx.report.check(what, paired_ratios(deployd.p50s(), echo.p50s()), "<=", 1.3)
    else:
        what = (
            f"overhead: {n_threads} in flight, deployd {deployd_row.work_items_per_second:.0f}/s"
            f" / echo {echo_row.work_items_per_second:.0f}/s"
        )
        ctx.report.check(what, paired_ratios(deployd.rates(), echo.rates()), ">=", 0.7)


# ---------------------------------------------------------------------------- load generators (children)


def sequential_load(spec: dict[str, Any]) -> dict[str, Any]:
    """One call at a time: the public client against a sync stub of the echo."""
    import grpc
    import torch

    from client import InterpreterManager

    x = torch.arange(ELEMENTS, dtype=torch.float32)
    payload = x.numpy().tobytes()
    with InterpreterManager(spec["deployd"], timeout=60) as manager:
        model = manager.load_package(spec["package"]).load_pickle("model", "model.pkl")
        with grpc.insecure_channel(spec["echo"], options=CHANNEL_OPTIONS) as channel:
            echo = echo_method(channel)
            calls = {
                DEPLOYD: lambda: model(x),
                ECHO: lambda: echo(Blob(data=payload), timeout=60),
            }
            if not torch.equal(calls[DEPLOYD](), x) or calls[ECHO]().data != payload:
                raise AssertionError("a round trip changed the data")
            for call in calls.values():
                timed_calls(call, 0.5, 200)  # warm-up
            return interleaved_rounds(calls, spec["rounds"], spec["window_seconds"], spec["max_calls"])


def in_flight_load(spec: dict[str, Any]) -> dict[str, Any]:
    """IN_FLIGHT calls at once from a grpc.aio client, same prebuilt request every call."""
    import torch

    from client import InterpreterManager

    x = torch.arange(ELEMENTS, dtype=torch.float32)
    with InterpreterManager(spec["deployd"], timeout=60) as manager:
        object_id = manager.load_package(spec["package"]).load_pickle("model", "model.pkl").id
    return asyncio.run(in_flight_rounds(spec, object_id, x))


def invoke_request(object_id: str, x: Any) -> Any:
    from client._values import to_wire
    from deployd_wire.proto import deployd_pb2 as pb

    request = pb.InvokeRequest(object_id=object_id)
    to_wire(x, request.args.add())
    return request


async def in_flight_rounds(spec: dict[str, Any], object_id: str, x: Any) -> dict[str, Any]:
    import grpc

    from deployd_wire.proto import deployd_pb2_grpc as pb_grpc

    payload = x.numpy().tobytes()
    async with (
        grpc.aio.insecure_channel(spec["deployd"], options=CHANNEL_OPTIONS) as deployd_channel,
        grpc.aio.insecure_channel(spec["echo"], options=CHANNEL_OPTIONS) as echo_channel,
    ):
        invoke = pb_grpc.DeploydStub(deployd_channel).Invoke
        echo = echo_method(echo_channel)
        requests = {DEPLOYD: (invoke, invoke_request(object_id, x)), ECHO: (echo, Blob(data=payload))}
        if (await invoke(requests[DEPLOYD][1])).result.tensor_value.data != payload:
            raise AssertionError("deployd changed the data")
        samples = {name: Samples() for name in requests}
        for method, request in requests.values():  # warm-up
            await in_flight_window(method, request, 1.0, 500)
        for _ in range(spec["rounds"]):
            for name, (method, request) in requests.items():
                samples[name].add(*await in_flight_window(method, request, spec["window_seconds"], spec["max_calls"]))
    return {name: collected.to_json() for name, collected in samples.items()}


async def in_flight_window(method: Any, request: Any, seconds: float, max_calls: int) -> tuple[list[float], float]:
    """IN_FLIGHT callers, each with one call in flight, until seconds pass or max_calls are done."""
    latencies: list[float] = []
    begun = [0]  # calls started: the bound, so calls in flight never overshoot max_calls
    started = time.perf_counter()
    deadline = started + seconds

    async def caller() -> None:
        while begun[0] < max_calls and time.perf_counter() < deadline:
            begun[0] += 1
            call_started = time.perf_counter()
            await method(request, timeout=60)
            latencies.append(time.perf_counter() - call_started)

    await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
    return latencies, time.perf_counter() - started
