"""v2load: a closed-loop load generator for the KServe v2 / Open Inference Protocol over gRPC
(`inference.GRPCInferenceService`), and the `v2` benchmark built on it.

As a command, against any v2 server (perf_analyzer's closed loop, in Python, on
tritonclient.grpc.aio):

    python -m bench.v2load --url 127.0.0.1:8001 --model seed --shape 1,1,10,10 --datatype FP32 \\
        --concurrency 1,2,4,8,16,32 --seconds 5 [--input-name input0] [--warmup-seconds 1] [--max-calls N] \\
        [--server-pids PID,...]

One call first checks that the model answers and prints its outputs. Then, for each
concurrency N: N asyncio tasks on one channel each send ModelInfer back to back, the same
input every call (one InferInput, filled once from numpy: uniform [0, 1) floats or small
integers from a fixed seed); first for --warmup-seconds, not counted, then for --seconds or
until --max-calls calls have begun, whichever comes first. Every call has a deadline
(--call-timeout). Printed per level: calls/s (calls that succeeded / the window's wall time,
up to the return of the last call in flight), p50 and p99 latency of the calls that
succeeded (ms), errors (calls that failed) and the first error, and CPU time per call (calls
made) of this process (all its threads, grpc's included) and, with --server-pids, of those
local server processes. Exit code 1 if a call failed. `run_load()` returns the same
figures as data (`LevelResult`).

As a benchmark (`python -m bench --only v2`): what the v2 mapping costs against deployd's own
protocol. One real daemon (a worker per core) serves the seed model (scripts/export_seed.py:
two convolutions) by name from its config's `models:`; the daemon's one gRPC port serves
both protocols. The same input, a 1x1x10x10 float32 tensor, goes to the same model:

- deployd.v1: the public client, `manager.model("seed")(x)`, from N threads;
- kserve.v2: ModelInfer from N asyncio tasks on tritonclient.grpc.aio (`run_load`);

at N = 1, 8 and 32 calls in flight, from one load-generator process, in interleaved rounds
(the order of the two flips every round). First a v2 answer must equal the v1 answer bit for
bit. Printed per N: calls/s, p50 and p99 of both, and v2 / v1 for calls/s and p50 (the
median over rounds of the ratio within a round; no target), and CPU time per call of the
daemon (where the v2 mapping runs; the workers do the same for both) and of the load
generator, over all rounds. The ratios include each client's own CPU per call, which shares
the cores with the daemon and its workers. Failed v2 calls: target 0.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bench.common import (
    REPO,
    BenchError,
    Context,
    Daemon,
    Samples,
    paired_ratios,
    percentile,
    python_command,
    ratio,
    run_in_child,
    threaded_window,
)

if TYPE_CHECKING:
    import numpy as np

DEFAULT_MAX_CALLS = 1_000_000  # per level
DEFAULT_CALL_TIMEOUT_S = 60.0
_MARGIN_S = 30.0  # past the window and one call's deadline, a level is stuck


# ---------------------------------------------------------------------------- the load generator


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level's measured window: calls that succeeded, failed, and how long."""

    concurrency: int
    calls: int  # that succeeded
    errors: int  # calls that failed
    seconds: float  # the window's wall time, up to the return of its last call
    latencies_s: list[float] = field(repr=False)  # of the calls that succeeded
    first_error: str = ""
    client_cpu_s: float = 0.0  # CPU time of this process (all its threads) in the window
    server_cpu_s: float | None = None  # of the server processes named (server_pids), if any

    @property
    def client_cpu_us_per_call(self) -> float:
        return ratio(self.client_cpu_s, self.calls + self.errors) * 1e6

    @property
    def server_cpu_us_per_call(self) -> float:
        return float("nan") if self.server_cpu_s is None else ratio(self.server_cpu_s, self.calls + self.errors) * 1e6

    @property
    def calls_per_second(self) -> float:
        return ratio(self.calls, self.seconds)

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_s, 50) * 1000.0

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_s, 99) * 1000.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LevelResult:
        return cls(**data)


@dataclass(frozen=True)
class Output:
    """One output of a ModelInfer answer."""

    name: str
    datatype: str
    shape: list[int]

    def __str__(self) -> str:
        return f"{self.name} {self.datatype} [{', '.join(map(str, self.shape))}]"


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes (from /proc; one that is gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / os.sysconf("SC_CLK_TCK")


def make_data(shape: Sequence[int], datatype: str, seed: int = 0) -> np.ndarray:
    """A fixed input of this shape and v2 datatype: uniform [0, 1) floats, integers 0-99, random
    booleans, or b"x" for BYTES."""
    import numpy as np
    from tritonclient.utils import triton_to_np_dtype  # type: ignore[import-untyped]

    dtype = triton_to_np_dtype(datatype)
    if dtype is None:
        raise ValueError(f"unknown v2 datatype {datatype!r}")
    rng = np.random.default_rng(seed)
    if datatype == "BYTES":
        return np.full(tuple(shape), b"x", dtype=np.object_)
    if datatype == "BOOL":
        return rng.random(tuple(shape)) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 100, size=tuple(shape)).astype(dtype)
    return rng.random(tuple(shape)).astype(dtype)  # FP16, FP32, FP64, BF16 (ml_dtypes.bfloat16)


def infer_input(input_name: str, data: np.ndarray, datatype: str) -> Any:
    import tritonclient.grpc.aio as grpcclient  # type: ignore[import-untyped]

    built = grpcclient.InferInput(input_name, list(data.shape), datatype)
    built.set_data_from_numpy(data)
    return built


async def probe(
    url: str,
    model: str,
    data: np.ndarray,
    datatype: str,
    *,
    input_name: str = "input0",
    model_version: str = "",
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
) -> list[tuple[Output, np.ndarray]]:
    """One ModelInfer; returns each output and its value. Raises what the call raised."""
    import tritonclient.grpc.aio as grpcclient

    async with grpcclient.InferenceServerClient(url) as client:
        result = await client.infer(
            model, [infer_input(input_name, data, datatype)], model_version=model_version, client_timeout=call_timeout_s
        )
    answers = []
    for output in result.get_response().outputs:
        value = result.as_numpy(output.name)
        answers.append((Output(output.name, output.datatype, list(output.shape)), value))
    return answers


async def closed_loop(
    call: Callable[[], Awaitable[object]],
    concurrency: int,
    seconds: float,
    max_calls: int,
    call_timeout_s: float,
    server_pids: Sequence[int] = (),
) -> LevelResult:
    """concurrency tasks call back to back until seconds pass or max_calls calls have begun."""
    latencies: list[float] = []
    errors: list[str] = []  # the first failure's message, then "" for each later one
    begun = [0]  # calls started: the bound, so calls in flight never overshoot max_calls
    server_cpu = cpu_seconds(server_pids)
    client_cpu = time.process_time()
    started = time.perf_counter()
    deadline = started + seconds

    async def caller() -> None:
        while begun[0] < max_calls and time.perf_counter() < deadline:
            begun[0] += 1
            call_started = time.perf_counter()
            try:
                await call()
            except Exception as error:  # a failed call is counted, not fatal
                errors.append("" if errors else f"{type(error).__name__}: {error}")
                continue
            latencies.append(time.perf_counter() - call_started)

    await asyncio.wait_for(
        asyncio.gather(*(caller() for _ in range(concurrency))), seconds + call_timeout_s + _MARGIN_S
    )
    elapsed = time.perf_counter() - started
    client_cpu = time.process_time() - client_cpu
    server = cpu_seconds(server_pids) - server_cpu if server_pids else None
    first_error = errors[0] if errors else ""
    return LevelResult(concurrency, len(latencies), len(errors), elapsed, latencies, first_error, client_cpu, server)


async def run_load(
    url: str,
    model: str,
    shape: Sequence[int],
    datatype: str,
    concurrency: Sequence[int],
    seconds: float,
    *,
    input_name: str = "input0",
    warmup_seconds: float = 1.0,
    max_calls: int = DEFAULT_MAX_CALLS,
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    model_version: str = "",
    data: np.ndarray | None = None,
    server_pids: Sequence[int] = (),
) -> list[LevelResult]:
    """The closed loop at each concurrency in turn, on one channel; one LevelResult per level.

    data (default: make_data(shape, datatype)) is sent in every call; each level first runs
    warmup_seconds uncounted, then at most seconds and max_calls calls. server_pids: local
    server processes whose CPU time each measured window reports (server_cpu_s).
    """
    import tritonclient.grpc.aio as grpcclient

    array = make_data(shape, datatype) if data is None else data
    inputs = [infer_input(input_name, array, datatype)]
    results: list[LevelResult] = []
    async with grpcclient.InferenceServerClient(url) as client:

        def call() -> Awaitable[object]:
            return client.infer(model, inputs, model_version=model_version, client_timeout=call_timeout_s)

        for level in concurrency:
            if warmup_seconds > 0:
                await closed_loop(call, level, warmup_seconds, max_calls, call_timeout_s)
            results.append(await closed_loop(call, level, seconds, max_calls, call_timeout_s, server_pids))
    return results


def format_levels(results: Sequence[LevelResult]) -> str:
    """The table: one line per level; CPU per call in microseconds (the server's if measured)."""
    with_server = any(level.server_cpu_s is not None for level in results)
    header: tuple[str, ...] = ("concurrency", "calls", "calls/s", "p50 ms", "p99 ms", "errors", "client cpu us/call")
    header += ("server cpu us/call",) if with_server else ()
    cells = [header] + [
        (
            str(level.concurrency),
            str(level.calls),
            f"{level.calls_per_second:.1f}",
            f"{level.p50_ms:.3f}",
            f"{level.p99_ms:.3f}",
            str(level.errors),
            f"{level.client_cpu_us_per_call:.0f}",
        )
        + ((f"{level.server_cpu_us_per_call:.0f}",) if with_server else ())
        for level in results
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines += [
        f"first error at concurrency {level.concurrency}: {level.first_error}" for level in results if level.errors
    ]
    return "\n".join(lines)


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.v2load",
        description="Closed-loop load on a KServe v2 (Open Inference Protocol) gRPC server: ModelInfer "
        "from N asyncio tasks at each concurrency; prints calls/s, p50/p99 latency and errors per level.",
    )
    parser.add_argument("--url", required=True, help="host:port of the v2 gRPC server")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--model-version", default="", help="model version (default: the server's choice)")
    parser.add_argument("--shape", type=_positive_ints, required=True, help="input shape, e.g. 1,1,10,10")
    parser.add_argument("--datatype", default="FP32", help="v2 datatype of the input (FP32, INT64, ...)")
    parser.add_argument("--input-name", default="input0", help="the input's name (default input0)")
    parser.add_argument("--concurrency", type=_positive_ints, default=[1], help="levels, e.g. 1,2,4,8 (default 1)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per level (default 5)")
    parser.add_argument("--warmup-seconds", type=float, default=1.0, help="uncounted seconds per level (default 1)")
    parser.add_argument(
        "--max-calls",
        type=int,
        default=DEFAULT_MAX_CALLS,
        help=f"calls per level at most (default {DEFAULT_MAX_CALLS})",
    )
    parser.add_argument(
        "--server-pids",
        type=_positive_ints,
        default=[],
        help="local server processes (comma-separated pids) whose CPU time per call to report",
    )
    parser.add_argument(
        "--call-timeout",
        type=float,
        default=DEFAULT_CALL_TIMEOUT_S,
        help=f"deadline of each call, seconds (default {DEFAULT_CALL_TIMEOUT_S:g})",
    )
    options = parser.parse_args(argv)
    if options.seconds <= 0 or options.warmup_seconds < 0 or options.max_calls < 1 or options.call_timeout <= 0:
        parser.error("--seconds, --max-calls and --call-timeout must be > 0, --warmup-seconds >= 0")
    return options


async def _main(options: argparse.Namespace) -> int:
    data = make_data(options.shape, options.datatype)
    print(
        f"{options.url}: model {options.model!r}, input {options.input_name} {options.datatype}"
        f" [{', '.join(map(str, options.shape))}]",
        flush=True,
    )
    try:
        answers = await probe(
            options.url,
            options.model,
            data,
            options.datatype,
            input_name=options.input_name,
            model_version=options.model_version,
            call_timeout_s=options.call_timeout,
        )
    except Exception as error:
        print(f"the first ModelInfer failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"outputs: {'; '.join(str(output) for output, _ in answers) or '(none)'}", flush=True)
    results = await run_load(
        options.url,
        options.model,
        options.shape,
        options.datatype,
        options.concurrency,
        options.seconds,
        input_name=options.input_name,
        warmup_seconds=options.warmup_seconds,
        max_calls=options.max_calls,
        call_timeout_s=options.call_timeout,
        model_version=options.model_version,
        data=data,
        server_pids=options.server_pids,
    )
    print(format_levels(results))
    return 1 if any(level.errors for level in results) else 0


def main(argv: list[str]) -> int:
    return asyncio.run(_main(parse_args(argv)))


# ---------------------------------------------------------------------------- the benchmark

BENCHMARK = "v2_seed"
V1 = "deployd.v1"
V2 = "kserve.v2"
MODEL = "seed"
SHAPE = (1, 1, 10, 10)
DATATYPE = "FP32"
INPUT_NAME = "input0"
CPU_KEYS = ("daemon_s", "client_s", "calls")


@dataclass(frozen=True)
class Params:
    levels: tuple[int, ...]  # calls in flight
    rounds: int
    window_seconds: float
    warmup_seconds: float  # before every window, uncounted
    max_calls: int  # per window and strategy


FULL = Params(levels=(1, 8, 32), rounds=5, window_seconds=2.0, warmup_seconds=0.3, max_calls=100000)
SMOKE = Params(levels=(1, 8), rounds=1, window_seconds=0.5, warmup_seconds=0.1, max_calls=500)


class SeedDaemon(Daemon):
    """The daemon with the seed package in its packages directory and served by name from `models:`."""

    def __init__(self, workdir: Path, workers: int, package: Path) -> None:
        super().__init__(workdir, workers)
        self.package = package
        self.label = f"{self.label}, {MODEL} by name"

    def write_config(self) -> Path:
        path = super().write_config()
        shutil.copyfile(self.package, path.parent / "packages" / "seed.pt")
        config = yaml.safe_load(path.read_text())
        config["models"] = [{"name": MODEL, "package": "seed.pt", "pickle": "model:model.pkl"}]
        path.write_text(yaml.safe_dump(config))
        return path


def export_seed(directory: Path, timeout: float = 300.0) -> Path:
    """The seed package, written by scripts/export_seed.py in a process of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "seed.pt"
    quiet = "ignore:TypedStorage is deprecated:UserWarning"  # torch.package's pickles; it says nothing here
    command = python_command("-W", quiet, str(REPO / "scripts" / "export_seed.py"), str(out))
    try:
        subprocess.run(command, cwd=REPO, stdin=subprocess.DEVNULL, check=True, timeout=timeout)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        raise BenchError(f"scripts/export_seed.py failed: {error}") from None
    return out


def run(ctx: Context) -> None:
    if importlib.util.find_spec("tritonclient") is None:
        raise BenchError("the v2 benchmark needs tritonclient: pip install 'tritonclient[grpc]'")
    params = SMOKE if ctx.smoke else FULL
    package = export_seed(ctx.workdir / "packages")
    with SeedDaemon(ctx.workdir, ctx.cpu_count, package) as daemon:
        spec = {"target": daemon.target, "daemon_pid": daemon.pid, **asdict(params)}
        windows = params.rounds * len(params.levels) * 2
        result = run_in_child("bench.v2load:side_by_side_load", spec, 300 + windows * (params.window_seconds + 30))
    report(ctx, result, params)


def report(ctx: Context, result: dict[str, Any], params: Params) -> None:
    ctx.report.line(
        f"v2: ModelInfer of {MODEL} answers {result['outputs']}, bit for bit deployd.v1's answer to the same"
        f" {'x'.join(map(str, SHAPE))} float32"
    )
    for level in params.levels:
        v1, v2 = (Samples.from_json(result[strategy][str(level)]) for strategy in (V1, V2))
        rows = {
            strategy: ctx.report.add(samples.row(BENCHMARK, strategy, level))
            for strategy, samples in ((V1, v1), (V2, v2))
        }
        p99 = {V1: percentile(v1.latencies, 99) * 1000, V2: percentile(v2.latencies, 99) * 1000}
        figures = "; ".join(
            f"{strategy} {rows[strategy].work_items_per_second:.0f}/s, p50 {rows[strategy].p50_latency:.3f} ms,"
            f" p99 {p99[strategy]:.3f} ms"
            for strategy in (V1, V2)
        )
        rates = paired_ratios(v2.rates(), v1.rates())
        p50s = paired_ratios(v2.p50s(), v1.p50s())
        ctx.report.line(
            f"v2: {level} in flight: {figures}; v2/v1 calls/s {spread(rates)}, p50 {spread(p50s)} (no target)"
        )
        cpu = {strategy: result["cpu"][strategy][str(level)] for strategy in (V1, V2)}
        daemon_us = {strategy: ratio(used["daemon_s"], used["calls"]) * 1e6 for strategy, used in cpu.items()}
        client_us = {strategy: ratio(used["client_s"], used["calls"]) * 1e6 for strategy, used in cpu.items()}
        ctx.report.line(
            f"v2: {level} in flight, CPU per call: the daemon {V1} {daemon_us[V1]:.0f} us, {V2} {daemon_us[V2]:.0f} us"
            f" ({ratio(daemon_us[V2], daemon_us[V1]):.2f}x); the load generator {V1} {client_us[V1]:.0f} us,"
            f" {V2} {client_us[V2]:.0f} us ({ratio(client_us[V2], client_us[V1]):.2f}x)"
        )
    for message in result["first_errors"]:
        ctx.report.line(f"v2: a failed ModelInfer: {message}")
    ctx.report.check("v2: ModelInfer calls failed", sum(result["errors"].values()), "<=", 0, "calls")


def spread(values: list[float]) -> str:
    """The median of per-round ratios, and their range when there are several."""
    text = f"{statistics.median(values):.2f}x"
    if len(values) > 1:
        text += f" (median of {len(values)} rounds, {min(values):.2f}-{max(values):.2f})"
    return text


# ---------------------------------------------------------------------------- load generator (child)


def side_by_side_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Both protocols against the seed model, in interleaved rounds at each level. Returns Samples as JSON."""
    import torch

    from client import InterpreterManager

    data = make_data(SHAPE, DATATYPE)
    x = torch.from_numpy(data)
    target = spec["target"]
    samples = {strategy: {level: Samples() for level in spec["levels"]} for strategy in (V1, V2)}
    # CPU seconds of the daemon and of this process in the measured windows, and their calls
    cpu = {strategy: {level: dict.fromkeys(CPU_KEYS, 0.0) for level in spec["levels"]} for strategy in (V1, V2)}
    daemon = [spec["daemon_pid"]]
    errors = dict.fromkeys(spec["levels"], 0)
    first_errors: list[str] = []
    with InterpreterManager(target, timeout=60) as manager:
        seed = manager.model(MODEL)
        expected = seed(x).numpy()
        answers = asyncio.run(probe(target, MODEL, data, DATATYPE, input_name=INPUT_NAME))
        check_answers(answers, expected)

        def v1_window(level: int, seconds: float) -> LevelResult:
            daemon_cpu, client_cpu = cpu_seconds(daemon), time.process_time()
            latencies, elapsed = threaded_window(lambda: seed(x), level, seconds, max(1, spec["max_calls"] // level))
            client_cpu = time.process_time() - client_cpu
            daemon_cpu = cpu_seconds(daemon) - daemon_cpu
            return LevelResult(level, len(latencies), 0, elapsed, latencies, "", client_cpu, daemon_cpu)

        def v2_window(level: int, seconds: float) -> LevelResult:
            [result] = asyncio.run(
                run_load(
                    target,
                    MODEL,
                    SHAPE,
                    DATATYPE,
                    [level],
                    seconds,
                    input_name=INPUT_NAME,
                    warmup_seconds=spec["warmup_seconds"],
                    max_calls=spec["max_calls"],
                    data=data,
                    server_pids=daemon,
                )
            )
            return result

        for round_index in range(spec["rounds"]):
            for level in spec["levels"]:
                for strategy in (V1, V2) if round_index % 2 == 0 else (V2, V1):
                    if strategy == V1:
                        v1_window(level, spec["warmup_seconds"])
                        result = v1_window(level, spec["window_seconds"])
                    else:
                        result = v2_window(level, spec["window_seconds"])
                    samples[strategy][level].add(result.latencies_s, result.seconds)
                    used = cpu[strategy][level]
                    used["calls"] += result.calls + result.errors
                    used["client_s"] += result.client_cpu_s
                    used["daemon_s"] += result.server_cpu_s or 0.0
                    errors[level] += result.errors
                    if result.errors and len(first_errors) < 3:
                        first_errors.append(f"{level} in flight: {result.first_error} ({result.errors} failed)")
    return {
        "outputs": "; ".join(str(output) for output, _ in answers),
        V1: {str(level): collected.to_json() for level, collected in samples[V1].items()},
        V2: {str(level): collected.to_json() for level, collected in samples[V2].items()},
        "cpu": {strategy: {str(level): used for level, used in cpu[strategy].items()} for strategy in (V1, V2)},
        "errors": {str(level): count for level, count in errors.items()},
        "first_errors": first_errors,
    }


def check_answers(answers: list[tuple[Output, np.ndarray]], expected: np.ndarray) -> None:
    """The v2 answer must be one output equal to the v1 answer: same shape, dtype and bits."""
    import numpy as np

    if len(answers) != 1:
        raise AssertionError(f"v2 answered {len(answers)} outputs ({'; '.join(str(o) for o, _ in answers)}), not 1")
    output, value = answers[0]
    if value is None or value.shape != expected.shape or value.dtype != expected.dtype:
        shown = "no value" if value is None else f"{value.dtype} {list(value.shape)}"
        raise AssertionError(f"v2 answered {output} ({shown}); v1 {expected.dtype} {list(expected.shape)}")
    if not np.array_equal(value, expected):
        worst = float(np.max(np.abs(value.astype(np.float64) - expected.astype(np.float64))))
        raise AssertionError(f"v2's answer differs from v1's: largest difference {worst:g}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
