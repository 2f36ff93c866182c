"""http_v2: KServe v2 over HTTP/REST (Triton's binary tensors) against KServe v2 over gRPC, same daemon.

Issue 20 asks the daemon's HTTP endpoint (server/api/kserve_http.py: aiohttp on the daemon's
loop) to keep up with its gRPC port: HTTP calls/s >= 0.7x gRPC's, for the same infer. One real
daemon (2 workers) serves the seed model (scripts/export_seed.py: two convolutions) by name from
its config's `models:`, gRPC on one port and HTTP on another (`server.http_address:
127.0.0.1:0`, learnt from its "http on HOST:PORT" log line). The same 1x1x10x10 float32 input
(bench.v2load.make_data) goes three ways:

- grpc: ModelInfer with raw_input_contents, what tritonclient.grpc sends, from N asyncio tasks
  on tritonclient.grpc.aio, one channel (bench.v2load's generator: `closed_loop` around
  `client.infer`, on asyncio's own loop);
- http-binary: POST /v2/models/seed/infer with Triton's binary extension (header
  Inference-Header-Content-Length; the input's `parameters.binary_data_size: 400`, then its
  400 raw bytes; the output asked for with `parameters.binary_data: true`), what
  tritonclient.http sends by default;
- http-json: the same with the input as JSON `data` and the output as JSON (for information:
  no target);

HTTP from bench.http_servers' load generator (one keep-alive HTTP/1.1 connection per call in
flight, the request bytes built once, replies parsed by httptools and compared whole with the
expected reply, on uvloop), which costs about half the CPU per call of a client library.

First the answers: each HTTP reply, decoded, must equal gRPC's answer bit for bit. Then at 1, 8
and 32 calls in flight, interleaved rounds (the order of the three turns every round), every
window after an uncounted warm-up window with fresh connections, bounded by time and calls.

Reported per level: calls/s, p50 and p99 of each; HTTP / gRPC calls/s (the median over rounds of
the ratio within a round; target >= 0.7x for binary tensors); CPU per call (/proc/PID/stat,
summed over the measured windows) of the daemon process (where the protocols differ), of its
workers (the same work either way) and of the load generator (it shares the 2 cores, so a
cheaper client leaves more CPU to the daemon: the ratio of calls/s includes that); the daemon's
CPU per call HTTP / gRPC; what other processes used meanwhile. Failed calls: target 0.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bench.common import (
    BenchError,
    Context,
    Samples,
    paired_ratios,
    percentile,
    ratio,
    run_in_child,
)
from bench.v2load import DATATYPE, INPUT_NAME, MODEL, SHAPE, SeedDaemon, export_seed

if TYPE_CHECKING:
    import numpy as np

    from bench.http_servers import Connection, Reply

BENCHMARK = "http_v2_seed"
GRPC = "grpc"
HTTP_BINARY = "http-binary"
HTTP_JSON = "http-json"
STRATEGIES = (GRPC, HTTP_BINARY, HTTP_JSON)
HTTP_BODIES = (HTTP_BINARY, HTTP_JSON)
WORKERS = 2
TARGET = 0.7  # HTTP binary / gRPC calls/s
CALL_TIMEOUT_S = 60.0
PACKAGES = ("tritonclient", "aiohttp", "httptools", "uvloop")
CPU_KEYS = ("daemon_s", "workers_s", "client_s", "others_s")


@dataclass(frozen=True)
class Params:
    levels: tuple[int, ...]  # calls in flight
    rounds: int
    window_seconds: float
    warmup_seconds: float  # before every window, uncounted
    max_calls: int  # per window


FULL = Params(levels=(1, 8, 32), rounds=7, window_seconds=1.5, warmup_seconds=0.3, max_calls=100000)
SMOKE = Params(levels=(1, 8, 32), rounds=1, window_seconds=0.2, warmup_seconds=0.05, max_calls=300)


class HttpSeedDaemon(SeedDaemon):
    """SeedDaemon with KServe v2 over HTTP on 127.0.0.1, port 0; http_port read from its log."""

    def __init__(self, workdir: Path, workers: int, package: Path) -> None:
        super().__init__(workdir, workers, package)
        self.http_port = 0
        self.label = f"{self.label}, HTTP on"

    def write_config(self) -> Path:
        path = super().write_config()
        config = yaml.safe_load(path.read_text())
        config["server"]["http_address"] = "127.0.0.1:0"
        path.write_text(yaml.safe_dump(config))
        return path

    def wait_serving(self, timeout: float = 180.0) -> None:
        super().wait_serving(timeout)
        # The daemon logs "http on ..." just before "listening on ...", so it is read by now.
        for line in list(self.lines):
            _, found, rest = line.partition("http on ")
            if found:
                self.http_port = int(rest.split()[0].rpartition(":")[2])
                return
        raise BenchError(f"{self.label}: no 'http on HOST:PORT' line in its log:\n{self.log}")


def run(ctx: Context) -> None:
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise BenchError(f"the http_v2 benchmark needs {', '.join(missing)} in the venv")
    from server.pool.procinfo import descendants_of

    params = SMOKE if ctx.smoke else FULL
    package = export_seed(ctx.workdir / "packages")
    daemon = HttpSeedDaemon(ctx.workdir, WORKERS, package)
    with daemon:  # __enter__ says Daemon: the name keeps the subclass's type
        spec = {
            "target": daemon.target,
            "http_port": daemon.http_port,
            "daemon_pid": daemon.pid,
            "worker_pids": sorted(descendants_of(daemon.pid)),
            **asdict(params),
        }
        windows = params.rounds * len(params.levels) * len(STRATEGIES)
        timeout = 120 + windows * (params.window_seconds + params.warmup_seconds + 30)
        result = run_in_child("bench.http_v2:side_by_side", spec, timeout)
    report(ctx, result, params)


# ---------------------------------------------------------------------------- the report


def spread(values: list[float], digits: int = 2, unit: str = "x") -> str:
    """The median, and the range when there are several values."""
    text = f"{statistics.median(values):.{digits}f}{unit}"
    if len(values) > 1:
        text += f" (median of {len(values)} rounds, {min(values):.{digits}f}-{max(values):.{digits}f})"
    return text


def per_call_us(windows: list[dict[str, Any]], key: str) -> float:
    """CPU seconds under key over all the windows / the calls they made, in microseconds."""
    calls = sum(len(window["latencies"]) + window["errors"] for window in windows)
    return ratio(sum(window[key] for window in windows), calls) * 1e6


def report(ctx: Context, result: dict[str, Any], params: Params) -> None:
    ctx.report.line(
        f"http_v2: {MODEL} answers {result['outputs']}; HTTP binary and JSON answers bit for bit gRPC's"
        f" (daemon with {WORKERS} workers, gRPC and HTTP on 127.0.0.1)"
    )
    windows: dict[str, dict[str, list[dict[str, Any]]]] = result["windows"]
    failed = 0
    for level in params.levels:
        cell = {strategy: windows[strategy][str(level)] for strategy in STRATEGIES}
        samples = {
            strategy: Samples([(window["latencies"], window["seconds"]) for window in runs])
            for strategy, runs in cell.items()
        }
        rows = {strategy: ctx.report.add(samples[strategy].row(BENCHMARK, strategy, level)) for strategy in STRATEGIES}
        errors = {strategy: sum(window["errors"] for window in runs) for strategy, runs in cell.items()}
        failed += sum(errors.values())
        figures = "; ".join(
            f"{strategy} {rows[strategy].work_items_per_second:.0f}/s, p50 {rows[strategy].p50_latency:.3f} ms,"
            f" p99 {percentile(samples[strategy].latencies, 99) * 1000:.3f} ms, {errors[strategy]} failed"
            for strategy in STRATEGIES
        )
        ctx.report.line(f"http_v2: {level} in flight: {figures}")
        grpc_rates = samples[GRPC].rates()
        json_rates = paired_ratios(samples[HTTP_JSON].rates(), grpc_rates)
        p50s = paired_ratios(samples[HTTP_BINARY].p50s(), samples[GRPC].p50s())
        ctx.report.line(
            f"http_v2: {level} in flight: http-json / grpc calls/s {spread(json_rates)} (no target);"
            f" http-binary / grpc p50 {spread(p50s)}"
        )
        cpu = {strategy: {key: per_call_us(runs, key) for key in CPU_KEYS} for strategy, runs in cell.items()}
        daemon_rounds = paired_ratios(
            [per_call_us([window], "daemon_s") for window in cell[HTTP_BINARY]],
            [per_call_us([window], "daemon_s") for window in cell[GRPC]],
        )
        ctx.report.line(
            f"http_v2: {level} in flight, CPU per call (us): the daemon "
            + ", ".join(f"{strategy} {cpu[strategy]['daemon_s']:.0f}" for strategy in STRATEGIES)
            + f"; http-binary / grpc {ratio(cpu[HTTP_BINARY]['daemon_s'], cpu[GRPC]['daemon_s']):.2f}x"
            f" over all rounds, {spread(daemon_rounds)} per round; http-json / grpc"
            f" {ratio(cpu[HTTP_JSON]['daemon_s'], cpu[GRPC]['daemon_s']):.2f}x; the workers "
            + ", ".join(f"{strategy} {cpu[strategy]['workers_s']:.0f}" for strategy in STRATEGIES)
            + "; the load generator "
            + ", ".join(f"{strategy} {cpu[strategy]['client_s']:.0f}" for strategy in STRATEGIES)
            + "; other processes "
            + ", ".join(f"{strategy} {cpu[strategy]['others_s']:.0f}" for strategy in STRATEGIES)
        )
        binary_rates = paired_ratios(samples[HTTP_BINARY].rates(), grpc_rates)
        ctx.report.check(f"http_v2: http-binary / grpc calls/s at {level} in flight", binary_rates, ">=", TARGET)
    ctx.report.line(f"http_v2: load average {result['load_before']} before, {result['load_after']} after")
    for message in result["first_errors"]:
        ctx.report.line(f"http_v2: a failed call: {message}")
    ctx.report.check("http_v2: calls failed", failed, "<=", 0, "calls")


# ---------------------------------------------------------------------------- load generator (child)


def http_bodies(output: str, data: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    """Each HTTP infer's body and extra headers, as tritonclient.http builds them."""
    tensor = {"name": INPUT_NAME, "shape": list(data.shape), "datatype": DATATYPE}
    raw = data.astype("<f4").tobytes()
    header = {
        "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": output, "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    plain = {
        "inputs": [{**tensor, "data": data.flatten().tolist()}],
        "outputs": [{"name": output, "parameters": {"binary_data": False}}],
    }
    return {
        HTTP_BINARY: (
            head + raw,
            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))},
        ),
        HTTP_JSON: (json.dumps(plain, separators=(",", ":")).encode(), {"Content-Type": "application/json"}),
    }


def decoded(reply: Reply) -> tuple[dict[str, Any], bytes]:
    """An HTTP infer reply's one output, and its value's bytes (float32, little-endian)."""
    import numpy as np

    status, body, header_length = reply
    if status != 200:
        raise AssertionError(f"HTTP infer answered {status}: {body[:300]!r}")
    length = len(body) if header_length is None else int(header_length)
    answer = json.loads(body[:length])
    if len(answer.get("outputs", [])) != 1:
        raise AssertionError(f"HTTP infer answered {len(answer.get('outputs', []))} outputs, not 1: {answer}")
    output = answer["outputs"][0]
    if "data" in output:
        return output, np.array(output["data"], dtype="<f4").tobytes()
    size = output["parameters"]["binary_data_size"]
    if length + size != len(body):
        raise AssertionError(f"binary_data_size {size} after {length} bytes of JSON, but the body has {len(body)}")
    return output, body[length:]


async def check_http(port: int, requests: dict[str, bytes], output: Any, value: np.ndarray) -> dict[str, Reply]:
    """Each HTTP infer once: its answer must be gRPC's bit for bit. Returns each reply (the expected)."""
    from bench.http_servers import Connection

    replies: dict[str, Reply] = {}
    connection = await Connection.open(port)
    try:
        for strategy, request in requests.items():
            reply = await asyncio.wait_for(connection.call(request), 30)
            got, raw = decoded(reply)
            if (got["name"], got["datatype"], got["shape"]) != (output.name, output.datatype, output.shape):
                raise AssertionError(f"{strategy} answered {got}; gRPC {output}")
            if raw != value.astype("<f4").tobytes():
                raise AssertionError(f"{strategy}'s answer differs from gRPC's: {raw[:64]!r}...")
            replies[strategy] = reply
    finally:
        connection.close()
    return replies


class Meter:
    """CPU seconds of the daemon, its workers, this process and everything else, over one window."""

    def __init__(self, daemon: int, workers: list[int]) -> None:
        self.daemon, self.workers = [daemon], workers

    def read(self) -> dict[str, float]:
        from bench.grpcio_versions import machine_busy_seconds
        from bench.v2load import cpu_seconds

        return {
            "daemon_s": cpu_seconds(self.daemon),
            "workers_s": cpu_seconds(self.workers),
            "client_s": time.process_time(),
            "busy_s": machine_busy_seconds(),
        }

    @staticmethod
    def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        used = {key: after[key] - before[key] for key in before}
        used["others_s"] = used.pop("busy_s") - used["daemon_s"] - used["workers_s"] - used["client_s"]
        return used


async def grpc_window(target: str, inputs: list[Any], level: int, spec: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """bench.v2load's closed loop on a fresh channel: a warm-up window, then a measured one."""
    import tritonclient.grpc.aio as grpcclient  # type: ignore[import-untyped]

    from bench.v2load import closed_loop

    async with grpcclient.InferenceServerClient(target) as client:

        def call() -> Any:
            return client.infer(MODEL, inputs, client_timeout=CALL_TIMEOUT_S)

        await closed_loop(call, level, spec["warmup_seconds"], spec["max_calls"], CALL_TIMEOUT_S)
        before = meter.read()
        result = await closed_loop(call, level, spec["window_seconds"], spec["max_calls"], CALL_TIMEOUT_S)
        used = Meter.used(before, meter.read())
    errors = [result.first_error] if result.errors else []
    return {"latencies": result.latencies_s, "seconds": result.seconds, "error_list": errors * result.errors, **used}


async def http_window(
    port: int, request: bytes, expected: Reply, level: int, spec: dict[str, Any], meter: Meter
) -> dict[str, Any]:
    """bench.http_servers' load generator on fresh connections: a warm-up window, then a measured one."""
    from bench.http_servers import Connection, window

    connections: list[Connection] = []
    try:
        for _ in range(level):
            connections.append(await Connection.open(port))
        args = (port, connections, request, expected)
        await window(*args, spec["warmup_seconds"], spec["max_calls"])
        before = meter.read()
        measured = await window(*args, spec["window_seconds"], spec["max_calls"])
        used = Meter.used(before, meter.read())
    finally:
        for connection in connections:
            connection.close()
    return {
        "latencies": measured["latencies"],
        "seconds": measured["seconds"],
        "error_list": measured["errors"],
        **used,
    }


def side_by_side(spec: dict[str, Any]) -> dict[str, Any]:
    """The three strategies at each level, interleaved rounds; returns every measured window."""
    from bench.http_servers import http_request
    from bench.v2load import infer_input, make_data, probe
    from server.app import eventloop

    target, port = spec["target"], spec["http_port"]
    data = make_data(SHAPE, DATATYPE)
    answers = asyncio.run(probe(target, MODEL, data, DATATYPE, input_name=INPUT_NAME))
    if len(answers) != 1 or answers[0][1] is None:
        raise AssertionError(f"gRPC ModelInfer answered {[str(output) for output, _ in answers]}, not one value")
    [(output, value)] = answers
    path = f"/v2/models/{MODEL}/infer"
    requests = {
        strategy: http_request(port, "POST", path, body, headers)
        for strategy, (body, headers) in http_bodies(output.name, data).items()
    }
    expected = eventloop.run(check_http(port, requests, output, value))
    inputs = [infer_input(INPUT_NAME, data, DATATYPE)]
    meter = Meter(spec["daemon_pid"], spec["worker_pids"])

    windows: dict[str, dict[str, list[dict[str, Any]]]] = {strategy: {} for strategy in STRATEGIES}
    first_errors: list[str] = []
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    for round_index in range(spec["rounds"]):
        turn = round_index % len(STRATEGIES)
        order = STRATEGIES[turn:] + STRATEGIES[:turn]  # no strategy always first
        for level in spec["levels"]:
            for strategy in order:
                if strategy == GRPC:
                    measured = asyncio.run(grpc_window(target, inputs, level, spec, meter))
                else:
                    args = (port, requests[strategy], expected[strategy], level, spec, meter)
                    measured = eventloop.run(http_window(*args))
                error_list = measured.pop("error_list")
                measured["errors"] = len(error_list)
                if error_list and len(first_errors) < 3:
                    first_errors.append(f"{strategy} at {level} in flight: {error_list[0]} ({len(error_list)} failed)")
                windows[strategy].setdefault(str(level), []).append(measured)
    return {
        "outputs": str(output),
        "windows": windows,
        "first_errors": first_errors,
        "load_before": load_before,
        "load_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
