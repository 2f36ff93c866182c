"""direct_scaling: calls/s of the identity with 1, 2, 4, 8 and 14 workers, direct against daemon path.

Issue 19's scaling target, for a machine with 16 cores: direct calls/s with N workers >= 0.7 x N x
those of one worker. The curve is reported either way, with the daemon path's beside it.

One daemon per worker count N (bench.direct's config: `pool.data_ports: 0`, the identity of 16
float32 by name), all started at once and idle but for the window that measures them. Counts above
the host's cores less 2 are left out (at least 1 and 2 are run). The load comes from several
processes, since a Python client costs about as much CPU per call as the server it calls: with one,
the client would be the ceiling long before 14 workers. For N workers, N // 2 + 1 of them keep
4 x N calls in flight together, each with bench.direct's closed loop and balancer:

    supervisor ── builds the package, starts the daemons and the load processes
       │           waits for every ready-<i> file, then writes go.json (t0, a monotonic time)
       ▼
    load process i (of P) ── connects to every daemon and every data port, checks the answers,
       │                     writes ready-<i>, waits for go.json
       ▼
    window k (at t0 + k x slot): N, path, calls in flight per process; a process with none
    sleeps through it; the others run a warm-up, then the measured window (bounded by time
    and calls); process 0 also reads the daemon's and its workers' CPU from /proc around it

The paths: direct (each call to the data port with the fewest calls in flight, what our client
does by default) and daemon (every call to the daemon's address, what `direct=False` does). Every
round gives each (N, path) one window; the order of the paths turns every round and that of the
counts reverses, so host noise hits them alike. Growth is the median over rounds of
rate(N) / (N x rate(1)) within a round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import struct
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    BenchError,
    Child,
    Context,
    Daemon,
    Samples,
    build_packages,
    paired_ratios,
    ratio,
    start_daemons,
    wait_until,
    workers_text,
)
from bench.direct import CALL_TIMEOUT_S, DAEMON, DIRECT, IDENTITY, Balancer, data_ports, serve_identity, window
from bench.echo import CHANNEL_OPTIONS

BENCHMARK = "direct_scaling_identity"
COUNTS = (1, 2, 4, 8, 14)  # the worker counts, for a 16-core machine
PATHS = (DIRECT, DAEMON)
LABELS = {DIRECT: "direct", DAEMON: "daemon path"}
IN_FLIGHT_PER_WORKER = 4
TARGET = 0.7  # direct(N) >= TARGET x N x direct(1)
CPU_NAMES = ("daemon_s", "workers_s", "client_s")  # the daemon, its workers, the load processes
Key = tuple[int, str]  # workers, path
Used = dict[str, float]  # calls, failed calls and CPU seconds (CPU_NAMES) summed over windows
PAYLOAD = struct.pack("<16f", *range(16))  # the identity's input: 0..15 as float32


@dataclass(frozen=True)
class Params:
    rounds: int
    window_seconds: float
    warmup_seconds: float  # before every measured window, uncounted
    slack_seconds: float  # after it: the last calls return, /proc is read
    max_calls: int  # per window and load process

    @property
    def slot_seconds(self) -> float:
        return self.warmup_seconds + self.window_seconds + self.slack_seconds


FULL = Params(rounds=4, window_seconds=2.0, warmup_seconds=0.3, slack_seconds=0.4, max_calls=200000)
SMOKE = Params(rounds=1, window_seconds=0.3, warmup_seconds=0.1, slack_seconds=0.3, max_calls=300)


def worker_counts(cpu_count: int, smoke: bool) -> list[int]:
    """The issue's counts that leave 2 cores to the daemon and the load; at least [1, 2]."""
    counts = [count for count in COUNTS if count <= cpu_count - 2]
    return [1, 2] if smoke or len(counts) < 2 else counts


def load_processes(workers: int) -> int:
    return workers // 2 + 1


def in_flight(workers: int) -> list[int]:
    """Calls in flight of each load process for this many workers: 4 x N in all, spread evenly."""
    total, processes = IN_FLIGHT_PER_WORKER * workers, load_processes(workers)
    return [total // processes + (1 if index < total % processes else 0) for index in range(processes)]


def schedule(counts: list[int], rounds: int) -> list[dict[str, Any]]:
    """Every window of the run, in order: worker count, path, calls in flight of each process."""
    windows = []
    for round_index in range(rounds):
        turn = round_index % len(PATHS)
        for count in counts if round_index % 2 == 0 else counts[::-1]:
            for path in PATHS[turn:] + PATHS[:turn]:
                windows.append({"round": round_index, "workers": count, "path": path, "in_flight": in_flight(count)})
    return windows


class ScalingDaemon(Daemon):
    """A daemon with data ports serving the identity by name."""

    def __init__(self, workdir: Path, workers: int, identity: Path) -> None:
        super().__init__(workdir, workers)
        self.identity = identity
        self.label = f"daemon with {workers_text(workers)} and data ports, {IDENTITY} by name"

    def write_config(self) -> Path:
        path = super().write_config()
        serve_identity(path, self.identity)
        return path


# ---------------------------------------------------------------------------- the supervisor's side


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    counts = worker_counts(ctx.cpu_count, ctx.smoke)
    identity = build_packages(ctx.workdir / "packages", {IDENTITY: {"kind": "identity"}})[IDENTITY]
    windows = schedule(counts, params.rounds)
    processes = max(load_processes(count) for count in counts)
    meeting = ctx.workdir / "direct_scaling"
    meeting.mkdir(exist_ok=True)
    with ExitStack() as stack:
        daemons = start_daemons(stack, [ScalingDaemon(ctx.workdir, count, identity) for count in counts])
        spec = {
            "daemons": [{"workers": d.workers, "target": d.target, "pid": d.pid} for d in daemons],
            "windows": windows,
            "meeting": str(meeting),
            **asdict(params),
            "slot_seconds": params.slot_seconds,
        }
        timeout = 300 + len(windows) * (params.slot_seconds + 30)
        children = [Child("bench.direct_scaling:scaling_load", {**spec, "index": i}, timeout) for i in range(processes)]
        for child in children:
            stack.callback(child.close)
        wait_ready(children, meeting)
        (meeting / "go.tmp").write_text(json.dumps({"t0": time.monotonic() + 1.0}))  # all start together
        (meeting / "go.tmp").rename(meeting / "go.json")
        results = [child.result() for child in children]
    report(ctx, counts, windows, results, processes)


def wait_ready(children: list[Child], meeting: Path, timeout: float = 300.0) -> None:
    """Until every load process has written its ready-<i> file; fails if one exits first."""

    def ready() -> bool:
        return all((meeting / f"ready-{i}").exists() for i in range(len(children)))

    def exited() -> bool:
        return any(child.process.poll() is not None for child in children)

    if not wait_until(lambda: ready() or exited(), timeout, 0.1) or not ready():
        raise BenchError(f"direct_scaling: a load process exited or was not ready in {timeout:.0f}s")


def merge(windows: list[dict[str, Any]], results: list[dict[str, Any]]) -> tuple[dict[Key, Samples], dict[Key, Used]]:
    """Per (workers, path): Samples (one per round, all processes' calls) and summed CPU and calls."""
    samples: dict[Key, Samples] = {}
    used: dict[Key, Used] = {}
    for index, planned in enumerate(windows):
        key = (planned["workers"], planned["path"])
        parts = [result["windows"][index] for result in results if result["windows"][index] is not None]
        latencies = [latency for part in parts for latency in part["latencies"]]
        rate = sum(ratio(len(part["latencies"]), part["seconds"]) for part in parts)
        elapsed = len(latencies) / rate if latencies else max(part["seconds"] for part in parts)
        samples.setdefault(key, Samples()).add(latencies, elapsed)
        total = used.setdefault(key, dict.fromkeys(("calls", "failed", *CPU_NAMES), 0.0))
        for part in parts:
            total["calls"] += len(part["latencies"]) + part["errors"]
            total["failed"] += part["errors"]
            for name in CPU_NAMES:
                total[name] += part[name]
    return samples, used


def report(
    ctx: Context, counts: list[int], windows: list[dict[str, Any]], results: list[dict[str, Any]], processes: int
) -> None:
    samples, used = merge(windows, results)
    for (count, path), collected in sorted(samples.items()):
        ctx.report.add(collected.row(BENCHMARK, path, count))
    rates = {key: collected.rates() for key, collected in samples.items()}
    median = statistics.median
    note = "" if ctx.cpu_count >= 16 else f"; this host has {ctx.cpu_count} cores: the issue's curve needs 16"
    ctx.report.line(
        f"direct_scaling: the identity (16 float32), {IN_FLIGHT_PER_WORKER} x N calls in flight from"
        f" N // 2 + 1 load processes ({processes} at most), {len(windows) // (2 * len(counts))} rounds{note}"
    )
    curve = [["N", "direct/s", "daemon path/s", "direct/daemon", "direct N/(N x 1)", "daemon path N/(N x 1)"]]
    cpu = [["N", *(f"{who}, {LABELS[path]}" for who in ("daemon", "workers", "load gen") for path in PATHS)]]
    for count in counts:
        direct, daemon = rates[(count, DIRECT)], rates[(count, DAEMON)]
        grown = {path: growth(rates, count, path) for path in PATHS}
        curve.append(
            [
                str(count),
                f"{median(direct):.0f}",
                f"{median(daemon):.0f}",
                f"{median(paired_ratios(direct, daemon)):.2f}x",
                f"{median(grown[DIRECT]):.2f}x",
                f"{median(grown[DAEMON]):.2f}x",
            ]
        )
        us = {path: per_call_us(used[(count, path)]) for path in PATHS}
        cpu.append([str(count), *(f"{us[path][name]:.1f}" for name in CPU_NAMES for path in PATHS)])
    ctx.report.line(f"direct_scaling: calls/s (median of rounds; growth target for direct >= {TARGET:g}x)")
    for line in columns(curve):
        ctx.report.line(f"direct_scaling:   {line}")
    ctx.report.line("direct_scaling: CPU per call, us (the daemon's and workers' /proc over the measured windows)")
    for line in columns(cpu):
        ctx.report.line(f"direct_scaling:   {line}")
    for count in counts[1:]:
        what = f"direct_scaling: direct calls/s, {workers_text(count)} / ({count} x 1 worker)"
        ctx.report.check(what, growth(rates, count, DIRECT), ">=", TARGET)
    late = sum(result["late"] for result in results)
    if late:
        ctx.report.line(f"direct_scaling: {late} windows of a load process began after their slot (a slow window)")
    for result in results:
        for message in result["first_errors"]:
            ctx.report.line(f"direct_scaling: a failed call: {message}")
    failed = sum(total["failed"] for total in used.values())
    ctx.report.check("direct_scaling: calls failed (all paths)", failed, "<=", 0, "calls")


def growth(rates: dict[Key, list[float]], count: int, path: str) -> list[float]:
    """rate(count) / (count x rate(1)) of each round."""
    return paired_ratios(rates[(count, path)], [count * rate for rate in rates[(1, path)]])


def per_call_us(used: Used) -> dict[str, float]:
    return {name: ratio(used[name], used["calls"]) * 1e6 for name in CPU_NAMES}


def columns(cells: list[list[str]]) -> list[str]:
    """Rows of cells, right-aligned in columns."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]


# ---------------------------------------------------------------------------- load process (child)


def scaling_load(spec: dict[str, Any]) -> dict[str, Any]:
    """One load process: its share of every window of the schedule. Returns its calls as JSON."""
    return asyncio.run(_scaling_load(spec))


async def _scaling_load(spec: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from bench.direct import tensor_fields
    from bench.v2load import cpu_seconds
    from deployd_wire.proto import deployd_pb2 as pb
    from deployd_wire.proto import deployd_pb2_grpc as pb_grpc

    index, meeting = spec["index"], Path(spec["meeting"])
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[16], data=PAYLOAD)
    request = pb.InvokeRequest(object_id=IDENTITY, args=[pb.Value(tensor_value=tensor)])
    async with contextlib.AsyncExitStack() as stack:

        def channel(target: str) -> grpc.aio.Channel:
            return stack.push_async_exit(grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS))

        balancers: dict[tuple[int, str], Balancer] = {}
        pids: dict[int, tuple[list[int], list[int]]] = {}  # workers -> ([daemon pid], worker pids)
        for daemon in spec["daemons"]:
            stub = pb_grpc.DeploydStub(channel(daemon["target"]))
            workers = await data_ports(stub, daemon["workers"], (IDENTITY,))
            count = daemon["workers"]
            balancers[(count, DAEMON)] = Balancer([stub.Invoke])
            balancers[(count, DIRECT)] = Balancer(
                [pb_grpc.DeploydStub(channel(worker.address)).Invoke for worker in workers]
            )
            pids[count] = ([daemon["pid"]], [worker.pid for worker in workers])
        for (count, path), balancer in balancers.items():  # every port answers bit for bit
            for invoke in balancer.methods:
                answer = (await invoke(request, timeout=CALL_TIMEOUT_S)).result
                if tensor_fields(answer) != (pb.DTYPE_FLOAT32, [16], PAYLOAD):
                    raise AssertionError(f"{path} with {workers_text(count)} changed the identity's data")
        (meeting / f"ready-{index}").write_text("")
        t0 = await wait_go(meeting / "go.json")
        windows: list[dict[str, Any] | None] = []
        first_errors: list[str] = []
        late = 0
        for slot, planned in enumerate(spec["windows"]):
            delay = t0 + slot * spec["slot_seconds"] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late += 1
            level = planned["in_flight"][index] if index < len(planned["in_flight"]) else 0
            if level == 0:
                windows.append(None)
                continue
            count, path = planned["workers"], planned["path"]
            balancer = balancers[(count, path)]
            await window(balancer, request, level, spec["warmup_seconds"], spec["max_calls"])
            daemon_pids, worker_pids = pids[count] if index == 0 else ([], [])
            before = (cpu_seconds(daemon_pids), cpu_seconds(worker_pids))
            result = await window(balancer, request, level, spec["window_seconds"], spec["max_calls"])
            after = (cpu_seconds(daemon_pids), cpu_seconds(worker_pids))
            windows.append(
                {
                    "latencies": result.latencies_s,
                    "seconds": result.seconds,
                    "errors": result.errors,
                    "client_s": result.client_cpu_s,
                    "daemon_s": after[0] - before[0],
                    "workers_s": after[1] - before[1],
                }
            )
            if result.errors and len(first_errors) < 3:
                first_errors.append(f"{path}, {workers_text(count)}: {result.first_error} ({result.errors} failed)")
    return {"windows": windows, "late": late, "first_errors": first_errors}


async def wait_go(path: Path, timeout: float = 600.0) -> float:
    """The start time the supervisor writes once every load process is ready."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"no {path.name} in {timeout:.0f}s")
        await asyncio.sleep(0.02)
    return float(json.loads(path.read_text())["t0"])
