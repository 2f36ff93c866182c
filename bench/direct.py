"""direct: calls answered by the workers' own ports (pool.data_ports) against the daemon path.

One real daemon (2 workers, `pool.data_ports: 0`) serves two models by name from its config's
`models:`: the identity (bench.models.Identity, a 16-element float32 tensor in and out) and the
seed (scripts/export_seed.py: two convolutions, a 1x1x10x10 float32 input, uniform [0, 1) from a
fixed seed). The load generator asks the daemon where the workers serve (deployd.v1
Endpoints) and sends the same prebuilt InvokeRequest (object_id = the model's name) every call,
from one process on grpc.aio (asyncio's own event loop), N tasks in flight, by three paths:

- daemon: every call to the daemon's address (one channel), which hands it to a worker;
- direct: one channel per worker's data port; each call goes to the port with the fewest calls
  in flight (a counter per channel; ties go to the one after the last chosen): torch::deploy's
  LoadBalancer, what our client does;
- floor: 2 processes, each a plain grpc.aio server (this module's `--floor`: deployd.v1 Invoke
  alone, on the daemon's event loop choice, one torch thread, no_grad, like a worker) running the
  same two packages in-process, balanced the same way: what a data port could at best be;

at N = 8 and 32 in flight for both models, and one call at a time for the identity against a
bare grpc.aio echo (bench.echo, the same 64 bytes); in interleaved rounds (the order of the
paths turns every round), every window after an uncounted warm-up window, each bounded by time
and calls. First every path must answer each model bit for bit as the daemon does.

Targets (issue 19), each the median over rounds of the ratio within a round: direct / daemon
path calls/s >= 1.5x, direct / floor >= 0.9x; the daemon's CPU per call on the direct path <= 5%
of its CPU per call on the daemon path (/proc/PID/stat of the daemon process alone, summed over
the measured windows); sequential p50 of the identity direct / echo <= 1.3x. Also printed: p50
and p99 of each path, CPU per call of the workers, the floor servers and the load generator,
the calls each data port took, and failed calls (target 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    REPO,
    BenchError,
    Context,
    Samples,
    build_packages,
    paired_ratios,
    percentile,
    python_command,
    ratio,
    run_in_child,
    stop_process,
    workers_text,
)
from bench.echo import CHANNEL_OPTIONS, EchoServer
from bench.v2load import LevelResult, SeedDaemon, closed_loop, cpu_seconds, export_seed

IDENTITY = "identity"
SEED = "seed"
MODELS = (IDENTITY, SEED)
SHAPES = {IDENTITY: (16,), SEED: (1, 1, 10, 10)}
WORKERS = 2
DAEMON = "daemon"
DIRECT = "direct"
FLOOR = "floor"
ECHO = "grpc-echo"
PATHS = (DAEMON, DIRECT, FLOOR)
SEQUENTIAL = (DIRECT, DAEMON, FLOOR, ECHO)  # the identity, one call at a time
CALL_TIMEOUT_S = 60.0  # each call's deadline
CPU_KEYS = ("client_s", "daemon_s", "workers_s", "floor_s", "calls", "failed")


@dataclass(frozen=True)
class Params:
    levels: tuple[int, ...]  # calls in flight
    rounds: int
    window_seconds: float
    warmup_seconds: float  # before every measured window, uncounted
    max_calls: int  # per window, all callers together


FULL = Params(levels=(8, 32), rounds=5, window_seconds=2.0, warmup_seconds=0.3, max_calls=50000)
SMOKE = Params(levels=(8, 32), rounds=1, window_seconds=0.3, warmup_seconds=0.1, max_calls=300)


def cases(levels: tuple[int, ...]) -> list[tuple[str, int, tuple[str, ...]]]:
    """(model, calls in flight, paths) of every window of a round, in order."""
    return [(model, level, PATHS) for model in MODELS for level in levels] + [(IDENTITY, 1, SEQUENTIAL)]


def case_key(model: str, level: int) -> str:
    return f"{model}/{level}"


# ---------------------------------------------------------------------------- the supervisor's side


class DirectDaemon(SeedDaemon):
    """The daemon with data ports (any free ones), serving the seed and the identity by name."""

    def __init__(self, workdir: Path, workers: int, seed: Path, identity: Path) -> None:
        super().__init__(workdir, workers, seed)
        self.identity = identity
        self.label = f"daemon with {workers_text(workers)} and data ports, {SEED} and {IDENTITY} by name"

    def write_config(self) -> Path:
        path = super().write_config()
        serve_identity(path, self.identity)
        return path


def serve_identity(config_path: Path, identity: Path) -> None:
    """Edit a bench daemon's config: data ports on (any free ones) and the identity served by name."""
    shutil.copyfile(identity, config_path.parent / "packages" / "identity.pt")
    config = yaml.safe_load(config_path.read_text())
    config["pool"]["data_ports"] = 0
    config.setdefault("models", []).append({"name": IDENTITY, "package": "identity.pt", "pickle": "model:model.pkl"})
    config_path.write_text(yaml.safe_dump(config))


class FloorServer:
    """`python -m bench.direct --floor`: a plain grpc.aio server with the models in-process."""

    def __init__(self, packages: dict[str, Path], lifetime: float = 1800.0) -> None:
        self.packages = packages
        self.lifetime = lifetime
        self.port = 0
        self.process: subprocess.Popen[str] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchError("the floor server was not started")
        return self.process.pid

    def launch(self) -> None:
        models = [f"{name}={path}" for name, path in self.packages.items()]
        command = python_command("-m", "bench.direct", "--floor", *models, "--lifetime", str(self.lifetime))
        self.process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)

    def wait_port(self, timeout: float = 120.0) -> None:
        """Read the port it prints once its models are loaded and it serves."""
        process = self.process
        if process is None or process.stdout is None:
            raise BenchError("the floor server was not started")
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            raise BenchError(f"the floor server did not report its port (exit code {process.poll()})")
        self.port = int(line)

    def stop(self) -> None:
        if self.process is None:
            return
        code = stop_process(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if code != 0:
            print(f"note: a floor server exited with code {code}", file=sys.stderr)
        self.process = None


def export_models(directory: Path) -> dict[str, Path]:
    """Both packages, built in parallel (each in a process of its own)."""
    with ThreadPoolExecutor(1) as pool:
        seed = pool.submit(export_seed, directory)
        identity = build_packages(directory, {IDENTITY: {"kind": "identity"}})[IDENTITY]
        return {IDENTITY: identity, SEED: seed.result()}


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    packages = export_models(ctx.workdir / "packages")
    with ExitStack() as stack:
        daemon = DirectDaemon(ctx.workdir, WORKERS, packages[SEED], packages[IDENTITY])
        floors = [FloorServer(packages) for _ in range(WORKERS)]
        servers: list[DirectDaemon | FloorServer] = [daemon, *floors]
        for server in servers:  # all start at once; the stack stops each
            stack.callback(server.stop)
            server.launch()
        echo = stack.enter_context(EchoServer())
        daemon.wait_serving()
        for floor in floors:
            floor.wait_port()
        spec = {
            "daemon": daemon.target,
            "daemon_pid": daemon.pid,
            "floors": [floor.target for floor in floors],
            "floor_pids": [floor.pid for floor in floors],
            "echo": echo.target,
            **asdict(params),
        }
        windows = params.rounds * sum(len(paths) for _, _, paths in cases(params.levels))
        window = params.window_seconds + params.warmup_seconds
        result = run_in_child("bench.direct:side_by_side_load", spec, 300 + windows * (window + 30))
    report(ctx, result, params)


def report(ctx: Context, result: dict[str, Any], params: Params) -> None:
    ctx.report.line(
        f"direct: {WORKERS} workers with data ports ({', '.join(result['ports'])}), {WORKERS} floor servers;"
        f" {IDENTITY} (16 float32) and {SEED} (1x1x10x10 float32) answer bit for bit alike on every path"
    )
    for model, level, paths in cases(params.levels):
        key = case_key(model, level)
        samples = {path: Samples.from_json(result["samples"][key][path]) for path in paths}
        rows = {path: ctx.report.add(samples[path].row(f"direct_{model}", path, level)) for path in paths}
        figures = "; ".join(
            f"{path} {rows[path].work_items_per_second:.0f}/s, p50 {rows[path].p50_latency:.3f} ms,"
            f" p99 {percentile(samples[path].latencies, 99) * 1000:.3f} ms"
            for path in paths
        )
        where = f"direct: {model}, {'one call at a time' if level == 1 else f'{level} in flight'}"
        ctx.report.line(f"{where}: {figures}")
        cpu = {path: result["cpu"][key][path] for path in paths}
        us = {path: {name: ratio(used[name], used["calls"]) * 1e6 for name in CPU_KEYS} for path, used in cpu.items()}
        ctx.report.line(
            f"{where}, CPU per call (us): "
            + "; ".join(
                f"{path}: daemon {us[path]['daemon_s']:.1f}, workers {us[path]['workers_s']:.0f},"
                f" floor servers {us[path]['floor_s']:.0f}, load generator {us[path]['client_s']:.0f}"
                for path in paths
            )
        )
        if level == 1:
            what = f"{where}: p50 direct {rows[DIRECT].p50_latency:.3f} ms / echo {rows[ECHO].p50_latency:.3f} ms"
            ctx.report.check(what, paired_ratios(samples[DIRECT].p50s(), samples[ECHO].p50s()), "<=", 1.3)
            continue
        rates = {path: samples[path].rates() for path in paths}
        ctx.report.check(
            f"{where}: calls/s direct / daemon path", paired_ratios(rates[DIRECT], rates[DAEMON]), ">=", 1.5
        )
        # What no data port could beat here: the load generator shares the machine's cores with
        # the servers, so a path's calls/s is bounded by the CPU per call of both together.
        ceiling = statistics.median(paired_ratios(rates[FLOOR], rates[DAEMON]))
        ctx.report.line(
            f"{where}: the ceiling, calls/s floor / daemon path = {ceiling:.2f}x"
            f" (median; CPU per call, load generator included: daemon path"
            f" {us[DAEMON]['daemon_s'] + us[DAEMON]['workers_s'] + us[DAEMON]['client_s']:.0f} us,"
            f" floor {us[FLOOR]['floor_s'] + us[FLOOR]['client_s']:.0f} us)"
        )
        ctx.report.check(f"{where}: calls/s direct / floor", paired_ratios(rates[DIRECT], rates[FLOOR]), ">=", 0.9)
        daemon_us = {path: us[path]["daemon_s"] for path in (DIRECT, DAEMON)}
        ctx.report.check(
            f"{where}: the daemon's CPU per call, direct {daemon_us[DIRECT]:.1f} us / daemon path"
            f" {daemon_us[DAEMON]:.0f} us",
            ratio(daemon_us[DIRECT], daemon_us[DAEMON]) * 100,
            "<=",
            5,
            "%",
        )
    ctx.report.line(f"direct: calls each data port took (all windows): {' / '.join(map(str, result['per_port']))}")
    for message in result["first_errors"]:
        ctx.report.line(f"direct: a failed call: {message}")
    failed = sum(used["failed"] for by_path in result["cpu"].values() for used in by_path.values())
    ctx.report.check("direct: calls failed (all paths)", failed, "<=", 0, "calls")


# ---------------------------------------------------------------------------- load generator (child)


class Balancer:
    """torch::deploy's LoadBalancer over gRPC channels: a call goes to the channel with the fewest
    calls in flight (a counter per channel); among equals, to the one after the last chosen."""

    def __init__(self, methods: list[Any]) -> None:
        self.methods = methods
        self.in_flight = [0] * len(methods)
        self.calls = [0] * len(methods)
        self._next = 0

    def choose(self) -> int:
        count = len(self.methods)
        best = self._next
        for step in range(1, count):
            index = (self._next + step) % count
            if self.in_flight[index] < self.in_flight[best]:
                best = index
        self._next = (best + 1) % count
        return best

    async def call(self, request: Any) -> Any:
        index = self.choose()
        self.in_flight[index] += 1
        self.calls[index] += 1
        try:
            return await self.methods[index](request, timeout=CALL_TIMEOUT_S)
        finally:
            self.in_flight[index] -= 1


def side_by_side_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Every path against both models, in interleaved rounds. Returns Samples and CPU as JSON."""
    return asyncio.run(_side_by_side(spec))


def invoke_requests() -> tuple[dict[str, Any], dict[str, Any]]:
    """Each model's input tensor, and its Invoke request by name (deployd.v1, one float32 tensor)."""
    import torch  # in the load-generator child only, like the rest of its imports

    from deployd_wire.proto import deployd_pb2 as pb

    inputs = {
        IDENTITY: torch.arange(16, dtype=torch.float32),
        SEED: torch.rand(SHAPES[SEED], generator=torch.Generator().manual_seed(0)),
    }
    requests = {
        model: pb.InvokeRequest(
            object_id=model,
            args=[
                pb.Value(tensor_value=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(x.shape), data=x.numpy().tobytes()))
            ],
        )
        for model, x in inputs.items()
    }
    return inputs, requests


async def data_ports(
    stub: Any, workers: int = WORKERS, models: tuple[str, ...] = MODELS, timeout: float = 120.0
) -> list[Any]:
    """The endpoints of the daemon's workers once each of them serves the models on its data port."""
    from deployd_wire.proto import deployd_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        answer = await stub.Endpoints(pb.EndpointsRequest(), timeout=30)
        serving = [worker for worker in answer.workers if set(models) <= set(worker.models)]
        if len(serving) >= workers:
            return sorted(serving, key=lambda worker: worker.slot)[:workers]
        if time.monotonic() > deadline:
            raise BenchError(f"the daemon named {len(serving)} data ports serving {models} in {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def _side_by_side(spec: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from bench.echo import Blob, echo_method
    from deployd_wire.proto import deployd_pb2_grpc as pb_grpc

    inputs, requests = invoke_requests()
    payload = inputs[IDENTITY].numpy().tobytes()
    async with contextlib.AsyncExitStack() as stack:

        def channel(target: str) -> grpc.aio.Channel:
            return stack.push_async_exit(grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS))

        daemon_stub = pb_grpc.DeploydStub(channel(spec["daemon"]))
        workers = await data_ports(daemon_stub)
        invokes = {
            DAEMON: [daemon_stub.Invoke],
            DIRECT: [pb_grpc.DeploydStub(channel(worker.address)).Invoke for worker in workers],
            FLOOR: [pb_grpc.DeploydStub(channel(target)).Invoke for target in spec["floors"]],
        }
        balancers = {path: Balancer(methods) for path, methods in invokes.items()}
        balancers[ECHO] = Balancer([echo_method(channel(spec["echo"]))])
        path_requests = {path: dict(requests) for path in PATHS}
        path_requests[ECHO] = {IDENTITY: Blob(data=payload)}
        await check_answers(invokes, requests, payload)
        if (await balancers[ECHO].call(path_requests[ECHO][IDENTITY])).data != payload:
            raise AssertionError("the echo changed the data")

        daemon_pid, worker_pids, floor_pids = spec["daemon_pid"], [worker.pid for worker in workers], spec["floor_pids"]
        samples: dict[str, dict[str, Samples]] = {}
        cpu: dict[str, dict[str, dict[str, float]]] = {}
        first_errors: list[str] = []
        for round_index in range(spec["rounds"]):
            for model, level, paths in cases(tuple(spec["levels"])):
                key = case_key(model, level)
                turn = round_index % len(paths)
                for path in paths[turn:] + paths[:turn]:
                    balancer, request = balancers[path], path_requests[path][model]
                    await window(balancer, request, level, spec["warmup_seconds"], spec["max_calls"])
                    before = (cpu_seconds([daemon_pid]), cpu_seconds(worker_pids), cpu_seconds(floor_pids))
                    result = await window(balancer, request, level, spec["window_seconds"], spec["max_calls"])
                    after = (cpu_seconds([daemon_pid]), cpu_seconds(worker_pids), cpu_seconds(floor_pids))
                    samples.setdefault(key, {}).setdefault(path, Samples()).add(result.latencies_s, result.seconds)
                    used = cpu.setdefault(key, {}).setdefault(path, dict.fromkeys(CPU_KEYS, 0.0))
                    used["client_s"] += result.client_cpu_s
                    used["daemon_s"] += after[0] - before[0]
                    used["workers_s"] += after[1] - before[1]
                    used["floor_s"] += after[2] - before[2]
                    used["calls"] += result.calls + result.errors
                    used["failed"] += result.errors
                    if result.errors and len(first_errors) < 3:
                        first_errors.append(f"{path}, {key}: {result.first_error} ({result.errors} failed)")
    return {
        "ports": [worker.address for worker in workers],
        "per_port": balancers[DIRECT].calls,
        "samples": {key: {path: s.to_json() for path, s in by_path.items()} for key, by_path in samples.items()},
        "cpu": cpu,
        "first_errors": first_errors,
    }


async def window(balancer: Balancer, request: Any, level: int, seconds: float, max_calls: int) -> LevelResult:
    """level tasks in flight, each calling back to back through the balancer, bounded by seconds and calls."""
    return await closed_loop(lambda: balancer.call(request), level, seconds, max_calls, CALL_TIMEOUT_S)


async def check_answers(invokes: dict[str, list[Any]], requests: dict[str, Any], payload: bytes) -> None:
    """Every port of every path answers each model as the daemon does, bit for bit."""
    for model, request in requests.items():
        [expected] = [(await invoke(request, timeout=CALL_TIMEOUT_S)).result for invoke in invokes[DAEMON]]
        if model == IDENTITY and expected.tensor_value.data != payload:
            raise AssertionError("the daemon path changed the identity's data")
        for path in (DIRECT, FLOOR):
            for index, invoke in enumerate(invokes[path]):
                answer = (await invoke(request, timeout=CALL_TIMEOUT_S)).result
                if tensor_fields(answer) != tensor_fields(expected):
                    raise AssertionError(f"{path} port {index} answers {model} unlike the daemon path")


def tensor_fields(value: Any) -> tuple[int, list[int], bytes]:
    wire = value.tensor_value
    return wire.dtype, list(wire.shape), wire.data


# ---------------------------------------------------------------------------- the floor server (process)


async def serve_floor(packages: dict[str, str], lifetime: float) -> None:
    """deployd.v1 Invoke of the packages' models (by name), on 127.0.0.1 port 0, until SIGTERM."""
    import warnings

    import grpc
    import torch
    from torch.package import PackageImporter

    from deployd_wire.proto import deployd_pb2 as pb

    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    torch.set_num_threads(1)  # as a worker (worker.num_threads)
    models: dict[str, Any] = {
        name: PackageImporter(path).load_pickle("model", "model.pkl") for name, path in packages.items()
    }

    async def invoke(request: Any, context: Any) -> Any:
        if request.object_id not in models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.object_id!r}")
        model = models[request.object_id]
        wire = request.args[0].tensor_value
        x = torch.frombuffer(wire.data, dtype=torch.float32).reshape(list(wire.shape))
        with torch.no_grad():
            y = model(x).contiguous()
        tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(y.shape), data=y.numpy().tobytes())
        return pb.InvokeResponse(result=pb.Value(tensor_value=tensor))

    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(
        invoke,
        request_deserializer=pb.InvokeRequest.FromString,
        response_serializer=pb.InvokeResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("deployd.v1.Deployd", {"Invoke": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(port, flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), lifetime)
    await server.stop(0)


def floor_main(argv: list[str]) -> int:
    from server.app import eventloop

    parser = argparse.ArgumentParser(prog="python -m bench.direct", description="the direct benchmark's floor server")
    parser.add_argument("--floor", nargs="+", required=True, metavar="NAME=PACKAGE", help="models to serve")
    parser.add_argument("--lifetime", type=float, default=1800.0, help="stop after this many seconds")
    options = parser.parse_args(argv)
    packages = dict(item.split("=", 1) for item in options.floor)
    # The same event loop as a worker's data port ("auto"), so the comparison is of what deployd adds.
    eventloop.run(serve_floor(packages, options.lifetime))
    return 0


if __name__ == "__main__":
    sys.exit(floor_main(sys.argv[1:]))
