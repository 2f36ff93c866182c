"""grpcio: the bare grpc.aio echo server under several grpcio releases, side by side.

grpcio 1.84.0 and later accept each RPC of a grpc.aio server through a new asyncio task and an
`asyncio.wait` over one pending request per registered method plus one for the generic handlers
(grpc/grpc PR #41796, registered methods in grpc.aio; the fix, grpc/grpc PR #43461, is not
released). That is per RPC, in the server's accept loop, for every unary-unary call. 1.80-1.83
still await one request at a time (their grpc.aio add_registered_method_handlers does nothing);
checked in the wheels: cygrpc.AioServer._make_request_call_future exists from 1.84.0 on. This
measures what it costs, per version:

- one virtualenv per grpcio version, cached under build/grpcio-venvs/<version>/, with only
  grpcio, protobuf and uvloop (protobuf and uvloop at the project venv's versions, so only
  grpcio differs), installed with pip from the package index;
- per version two server processes, each `python -m bench.grpcio_versions serve` in that venv
  on uvloop (the daemon's default loop, server/app/eventloop.py), 127.0.0.1 port 0, serving
  `Echo(Blob) returns (Blob)` (bench.echo's message):
  - generic: one generic handler, as bench.echo registers it;
  - registered: the echo and 34 idle methods as registered methods (and generic), 35 like the
    daemon's deployd.v1 (22), KServe v2 (9), health (3) and reflection (1): grpcio 1.84+ waits
    on one pending request per registered method for every RPC;
- one load generator (a child process in the project venv, grpcio of the project, uvloop, one
  channel per server, N tasks each with one call in flight) for every server, so only the
  server's grpcio differs;
- interleaved rounds: per round, per cell (handler kind, payload, N), every version in turn
  (A B C ..., the starting version rotating each round), each an uncounted warm-up window then
  a measured one, bounded by time and calls. Payloads: 64 B (16 float32s, deployd's small
  Invoke) and 64 KiB; N = 1, 8, 32 (the registered kind: 64 B only, the per-RPC cost is the
  same for any payload);
- a control: the baseline version run a second time in server processes of its own, so the
  spread of its ratio to itself is the noise of the run.

Reported per version and cell: calls/s and the **server's CPU per call** (its /proc/PID/stat
utime+stime, all threads, over the measured window, / the calls answered), medians over rounds
with min-max, and the ratio to the baseline (the grpcio pinned in constraints.txt, else the
project venv's): the median over rounds of the ratio within a round, and its range. Then the
same ratio over all cells of each handler kind, over only the rounds in which the rest of the
machine stayed quiet, and the headline: 64 B at 8 and 32 in flight, where the per-RPC cost of
the accept loop shows (at 1 in flight and at 64 KiB it drowns in the noise). Every window's
figures go to bench/results/grpcio_versions.json.

--smoke builds no venvs: it runs only the project venv's grpcio, once, for a moment.
`BENCH_GRPCIO_VERSIONS=1.80.1,1.85.3` picks the versions of a full run (the baseline is always
added), `BENCH_GRPCIO_ROUNDS=8` its rounds (6; about 80 s a round with all six versions).

This module's top level imports only the standard library: the same file runs as the server
in venvs that hold nothing but grpcio, protobuf and uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.common import Context

BENCHMARK = "grpcio_versions"
REPO = Path(__file__).resolve().parent.parent
VENVS = REPO / "build" / "grpcio-venvs"
# The newest patch release of each minor from 1.80 to the current; the change came in 1.84.0.
VERSIONS = ("1.80.1", "1.81.2", "1.82.3", "1.83.2", "1.84.2", "1.85.3")
VERSIONS_ENV = "BENCH_GRPCIO_VERSIONS"
ROUNDS_ENV = "BENCH_GRPCIO_ROUNDS"
SERVICE = "benchecho.Echo"
METHOD = f"/{SERVICE}/Echo"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
GENERIC = "generic"
REGISTERED = "registered"
KINDS = (GENERIC, REGISTERED)
REGISTERED_METHODS = 35  # the daemon's: deployd.v1 22, KServe v2 9, health 3, reflection 1
SMALL = 16 * 4  # 16 float32s
LARGE = 64 * 1024
CALL_TIMEOUT_S = 30.0
INSTALL_TIMEOUT_S = 600.0
SERVER_LIFETIME_S = 1800.0
CONTROL = "again"  # the baseline's second set of servers: the noise floor
# A cell's round counts as quiet when, in each of its measured windows, all other processes on
# the machine together used less than this share of one core.
QUIET_PERCENT = 30.0
# A measured window with fewer answered calls says nothing about CPU per call (a starved window on
# a saturated host): its figures are left out of the medians and ratios.
MIN_WINDOW_CALLS = 20
# The cells where the accept loop's per-RPC cost shows: small calls with several in flight.
HEADLINE = (SMALL, (8, 32))


@dataclass(frozen=True)
class Params:
    rounds: int
    window_seconds: float
    warmup_seconds: float  # before every measured window, uncounted
    max_calls: int  # per window, all tasks together
    levels: tuple[int, ...]  # calls in flight
    control: bool  # run the baseline a second time


FULL = Params(rounds=6, window_seconds=1.0, warmup_seconds=0.25, max_calls=20000, levels=(1, 8, 32), control=True)
SMOKE = Params(rounds=1, window_seconds=0.2, warmup_seconds=0.05, max_calls=200, levels=(1, 8, 32), control=False)


def cells(levels: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """(handler kind, payload bytes, calls in flight) measured in each round, in order."""
    sizes = {GENERIC: (SMALL, LARGE), REGISTERED: (SMALL,)}
    return [(kind, size, level) for kind in KINDS for size in sizes[kind] for level in levels]


def size_text(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


# ---------------------------------------------------------------------------- the server (any venv)


def blob_class() -> Any:
    """`message Blob { bytes data = 1; }` in a descriptor pool of its own (as bench.echo's)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto(name="bench/echo.proto", package="benchecho", syntax="proto3")
    blob = file.message_type.add(name="Blob")
    blob.field.add(
        name="data",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("benchecho.Blob"))


async def serve(kind: str, lifetime: float) -> None:
    import grpc

    blob = blob_class()

    async def echo(request: Any, context: Any) -> Any:
        return blob(data=request.data)

    handler = grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=blob.FromString, response_serializer=blob.SerializeToString
    )
    handlers = {"Echo": handler}
    if kind == REGISTERED:
        handlers.update({f"Idle{index}": handler for index in range(1, REGISTERED_METHODS)})
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if kind == REGISTERED:
        server.add_registered_method_handlers(SERVICE, handlers)  # as server/api/calls.py does
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"port": port, "grpcio": grpc.__version__, "loop": type(loop).__module__}), flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), lifetime)
    await server.stop(0)


def serve_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grpcio_versions serve")
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--lifetime", type=float, default=SERVER_LIFETIME_S, help="stop after this many seconds")
    options = parser.parse_args(argv)
    signal.alarm(int(options.lifetime) + 60)  # dies on its own even if the supervisor is gone
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # the daemon's "auto": asyncio's own loop where uvloop is missing
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(options.kind, options.lifetime))


# ---------------------------------------------------------------------------- the venvs (supervisor)


@dataclass(frozen=True)
class Slot:
    """One grpcio under test: its label (the version, or the version + CONTROL) and its python."""

    label: str
    version: str
    python: str


def installed(package: str) -> str:
    return metadata.version(package)


def pinned_grpcio() -> str:
    """The grpcio that constraints.txt pins, else the project venv's."""
    constraints = REPO / "constraints.txt"
    if constraints.exists():
        for line in constraints.read_text().splitlines():
            name, _, version = line.split("#")[0].strip().partition("==")
            if name.strip().lower() == "grpcio" and version.strip():
                return version.strip()
    return installed("grpcio")


def wanted_versions(baseline: str) -> list[str]:
    chosen = os.environ.get(VERSIONS_ENV, "")
    versions = [version.strip() for version in chosen.split(",") if version.strip()] or list(VERSIONS)
    if baseline not in versions:
        versions.append(baseline)
    return sorted(set(versions), key=lambda version: tuple(int(part) for part in version.split(".")))


def venv_python(version: str) -> str:
    """The python of a venv with grpcio==version, protobuf and uvloop as in the project venv (cached)."""
    directory = VENVS / version
    python = directory / "bin" / "python"
    wanted = {"grpcio": version, "protobuf": installed("protobuf"), "uvloop": installed("uvloop")}
    stamp = directory / "installed.json"
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return str(python)
    print(
        f"   building {directory.relative_to(REPO)} ({', '.join(f'{k}=={v}' for k, v in wanted.items())})", flush=True
    )
    stamp.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(directory)], check=True, timeout=120)
    install = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    subprocess.run([*install, *(f"{k}=={v}" for k, v in wanted.items())], check=True, timeout=INSTALL_TIMEOUT_S)
    check = (
        "import grpc, google.protobuf, uvloop, json; print(json.dumps([grpc.__version__, google.protobuf.__version__]))"
    )
    found = json.loads(subprocess.run([str(python), "-c", check], capture_output=True, text=True, check=True).stdout)
    if found != [version, wanted["protobuf"]]:
        raise RuntimeError(f"{directory} holds grpcio/protobuf {found}, not {version}/{wanted['protobuf']}")
    stamp.write_text(json.dumps(wanted))
    return str(python)


def slots(params: Params, smoke: bool, baseline: str) -> list[Slot]:
    if smoke:  # no venvs: only the project venv's grpcio
        return [Slot(installed("grpcio"), installed("grpcio"), sys.executable)]
    made = [Slot(version, version, venv_python(version)) for version in wanted_versions(baseline)]
    if params.control:
        base = next(slot for slot in made if slot.version == baseline)
        made.append(Slot(f"{baseline} {CONTROL}", baseline, base.python))
    return made


class Server:
    """One echo server process from a slot's venv; `with` starts it, leaving stops it by pid."""

    def __init__(self, slot: Slot, kind: str) -> None:
        self.slot, self.kind = slot, kind
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.info: dict[str, Any] = {}

    def __enter__(self) -> Server:
        from bench.common import BenchError

        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        command = [self.slot.python, "-m", "bench.grpcio_versions", "serve", "--kind", self.kind]
        command += ["--lifetime", str(SERVER_LIFETIME_S)]
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60.0)
        line = self.process.stdout.readline() if ready else ""
        try:
            self.info = json.loads(line)
            self.port = int(self.info["port"])
        except (ValueError, KeyError):
            self.__exit__()
            raise BenchError(f"the grpcio {self.slot.label} {self.kind} server did not report its port") from None
        if self.info["grpcio"] != self.slot.version:
            self.__exit__()
            raise BenchError(f"the {self.slot.label} server runs grpcio {self.info['grpcio']}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        from bench.common import stop_process

        if self.process is not None:
            stop_process(self.process)
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None


# ---------------------------------------------------------------------------- supervisor


def run(ctx: Context) -> None:
    from bench.common import RESULTS_DIR, run_in_child

    params = SMOKE if ctx.smoke else replace(FULL, rounds=int(os.environ.get(ROUNDS_ENV) or FULL.rounds))
    baseline = installed("grpcio") if ctx.smoke else pinned_grpcio()
    chosen = slots(params, ctx.smoke, baseline)
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(Server(slot, kind)) for slot in chosen for kind in KINDS]
        targets = [
            {"label": server.slot.label, "kind": server.kind, "port": server.port, "pid": server.process.pid}
            for server in servers
            if server.process is not None
        ]
        spec = {"targets": targets, "labels": [slot.label for slot in chosen], **asdict(params)}
        windows = params.rounds * len(chosen) * len(cells(params.levels))
        timeout = 120 + windows * (params.window_seconds + params.warmup_seconds + 5)
        started = time.monotonic()
        result = run_in_child("bench.grpcio_versions:side_by_side", spec, timeout)
        if not ctx.smoke:  # every window's figures, for a second look
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            (RESULTS_DIR / f"{BENCHMARK}.json").write_text(json.dumps({"spec": spec, **result}))
        loop = servers[0].info["loop"]
    report(ctx, result, params, chosen, baseline, loop, time.monotonic() - started)


def spread(values: list[float], digits: int = 0) -> str:
    """'median [min-max]' of per-round values, leaving out the NaNs of starved windows."""
    values = [value for value in values if value == value]
    if not values:
        return "n/a"
    text = f"{statistics.median(values):.{digits}f}"
    return text + (f" [{min(values):.{digits}f}-{max(values):.{digits}f}]" if len(values) > 1 else "")


def report(
    ctx: Context, result: dict[str, Any], params: Params, chosen: list[Slot], baseline: str, loop: str, took: float
) -> None:
    from bench.common import Samples, paired_ratios, ratio

    base = baseline  # the label of the baseline's first slot
    what = "smoke: only the project venv's grpcio, no venvs built" if ctx.smoke else f"{params.rounds} rounds"
    ctx.report.line(
        f"grpcio: bare grpc.aio echo server ({loop} loop) per grpcio version, one load generator (grpcio"
        f" {installed('grpcio')}), {what}, {params.window_seconds:g} s windows, {took:.0f} s; medians over"
        f" rounds [min-max]; ratio = version / {base}, median of the per-round ratios [range]"
    )
    cpu_ratios: dict[str, dict[str, list[float]]] = {slot.label: {kind: [] for kind in KINDS} for slot in chosen}
    quiet_ratios: dict[str, dict[str, list[float]]] = {slot.label: {kind: [] for kind in KINDS} for slot in chosen}
    quiet_rounds = dict.fromkeys(KINDS, 0)
    headline: dict[str, dict[str, list[float]]] = {slot.label: {kind: [] for kind in KINDS} for slot in chosen}
    headline_us: dict[str, list[float]] = {slot.label: [] for slot in chosen}
    failed = 0
    for kind, size, level in cells(params.levels):
        key = f"{kind}|{size}|{level}"
        rates: dict[str, list[float]] = {}
        cpus: dict[str, list[float]] = {}
        header = f"grpcio: {kind} handler{'s' if kind == REGISTERED else ''}, {size_text(size)}, {level} in flight"
        ctx.report.line(f"{header}:")
        ctx.report.line(
            f"grpcio:   {'version':>13}  {'calls/s':>17}  {'server CPU us/call':>18}"
            f"  {'CPU ratio':>17}  {'calls/s ratio':>17}"
        )
        for slot in chosen:
            windows = result["windows"][slot.label][key]
            samples = Samples([(window["latencies"], window["seconds"]) for window in windows])
            ctx.report.add(samples.row(BENCHMARK, f"{slot.label} {kind} {size_text(size)}", level))
            enough = [len(window["latencies"]) >= min(MIN_WINDOW_CALLS, params.max_calls) for window in windows]
            rates[slot.label] = [rate if ok else math.nan for rate, ok in zip(samples.rates(), enough, strict=True)]
            cpus[slot.label] = [
                ratio(window["server_cpu_s"], len(window["latencies"])) * 1e6 if ok else math.nan
                for window, ok in zip(windows, enough, strict=True)
            ]
            failed += sum(window["errors"] for window in windows)
        busy = [
            max(
                ratio(result["windows"][slot.label][key][index]["others_cpu_s"], 0.01 * params.window_seconds)
                for slot in chosen
            )
            for index in range(params.rounds)
        ]
        quiet = [index for index, percent in enumerate(busy) if percent < QUIET_PERCENT]
        quiet_rounds[kind] += len(quiet)
        for slot in chosen:
            cpu_ratio = paired_ratios(cpus[slot.label], cpus[base])
            quiet_ratios[slot.label][kind].extend(cpu_ratio[index] for index in quiet)
            if size == HEADLINE[0] and level in HEADLINE[1]:
                headline[slot.label][kind].extend(cpu_ratio)
                headline_us[slot.label].extend(cpus[slot.label])
            rate_ratio = paired_ratios(rates[slot.label], rates[base])
            cpu_ratios[slot.label][kind].extend(cpu_ratio)
            ctx.report.line(
                f"grpcio:   {slot.label:>13}  {spread(rates[slot.label]):>17}  {spread(cpus[slot.label]):>18}"
                f"  {spread(cpu_ratio, 2) + 'x':>17}  {spread(rate_ratio, 2) + 'x':>17}"
            )
    everything = [window for by_key in result["windows"].values() for runs in by_key.values() for window in runs]
    others = [ratio(window["others_cpu_s"], window["seconds"]) * 100 for window in everything]
    client = [ratio(window["client_cpu_s"], len(window["latencies"])) * 1e6 for window in everything]
    ctx.report.line(
        f"grpcio: other processes' CPU during the measured windows {spread(others)} % of one core (median"
        f" [min-max]; load average {result['load_before']} before, {result['load_after']} after); the load"
        f" generator's CPU per call {spread(client)} us"
    )
    for kind in KINDS:
        text = "; ".join(f"{label} {spread(by_kind[kind], 2)}x" for label, by_kind in cpu_ratios.items())
        ctx.report.line(f"grpcio: server CPU per call / {base}'s, all {kind} cells and rounds: {text} (no target)")
        if quiet_rounds[kind]:
            text = "; ".join(f"{label} {spread(by_kind[kind], 2)}x" for label, by_kind in quiet_ratios.items())
            ctx.report.line(
                f"grpcio: the same, quiet rounds only ({quiet_rounds[kind]} cell-rounds of"
                f" {len(cpu_ratios[base][kind])}, others < {QUIET_PERCENT:g}% of a core in every window): {text}"
            )
    text = "; ".join(
        f"{label} {spread(headline_us[label])} us, {spread(by_kind[GENERIC], 2)}x / {spread(by_kind[REGISTERED], 2)}x"
        for label, by_kind in headline.items()
    )
    ctx.report.line(
        f"grpcio: headline, {size_text(HEADLINE[0])} at {' and '.join(map(str, HEADLINE[1]))} in flight: server CPU"
        f" per call, and its ratio to {base}'s with the generic / the registered handlers: {text}"
    )
    for message in result["first_errors"]:
        ctx.report.line(f"grpcio: a failed call: {message}")
    ctx.report.check("grpcio: calls failed", failed, "<=", 0, "calls")


# ---------------------------------------------------------------------------- load generator (child)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all processes used, all cores (/proc/stat: everything but idle and iowait)."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def side_by_side(spec: dict[str, Any]) -> dict[str, Any]:
    """Every target, every cell, interleaved rounds; returns each window's latencies and CPU."""
    from server.app import eventloop

    return eventloop.run(_side_by_side(spec))


async def _side_by_side(spec: dict[str, Any]) -> dict[str, Any]:
    import grpc

    blob = blob_class()
    labels: list[str] = spec["labels"]
    targets = {(target["label"], target["kind"]): target for target in spec["targets"]}
    channels = {
        key: grpc.aio.insecure_channel(f"127.0.0.1:{t['port']}", options=CHANNEL_OPTIONS) for key, t in targets.items()
    }
    windows: dict[str, dict[str, list[dict[str, Any]]]] = {label: {} for label in labels}
    first_errors: list[str] = []
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    try:
        for channel in channels.values():
            await asyncio.wait_for(channel.channel_ready(), 30)
        methods = {
            key: channel.unary_unary(
                METHOD, request_serializer=blob.SerializeToString, response_deserializer=blob.FromString
            )
            for key, channel in channels.items()
        }
        requests = {size: blob(data=b"\x5a" * size) for size in (SMALL, LARGE)}

        async def window(call: Any, size: int, level: int, seconds: float) -> dict[str, Any]:
            latencies: list[float] = []
            errors: list[str] = []
            begun = [0]
            request = requests[size]
            deadline = time.perf_counter() + seconds

            async def caller() -> None:
                while begun[0] < spec["max_calls"] and time.perf_counter() < deadline:
                    begun[0] += 1
                    started = time.perf_counter()
                    try:
                        reply = await call(request, timeout=CALL_TIMEOUT_S)
                    except grpc.RpcError as error:  # counted, not fatal
                        errors.append(f"{type(error).__name__}: {error}")
                        continue
                    if len(reply.data) != size:
                        raise RuntimeError(f"echo answered {len(reply.data)} bytes, not {size}")
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(level))), seconds + 120)
            return {"latencies": latencies, "seconds": time.perf_counter() - started, "errors": errors}

        for round_index in range(spec["rounds"]):
            turn = round_index % len(labels)
            order = labels[turn:] + labels[:turn]  # A B C, B C A, ...: no version always first
            for kind, size, level in cells(tuple(spec["levels"])):
                key = f"{kind}|{size}|{level}"
                for label in order:
                    target = targets[(label, kind)]
                    call = methods[(label, kind)]
                    await window(call, size, level, spec["warmup_seconds"])
                    busy, server_cpu, client_cpu = (
                        machine_busy_seconds(),
                        cpu_seconds(target["pid"]),
                        time.process_time(),
                    )
                    measured = await window(call, size, level, spec["window_seconds"])
                    measured["server_cpu_s"] = cpu_seconds(target["pid"]) - server_cpu
                    measured["client_cpu_s"] = time.process_time() - client_cpu
                    # what everything else on the machine used meanwhile: the noise of this window
                    measured["others_cpu_s"] = (
                        machine_busy_seconds() - busy - measured["server_cpu_s"] - measured["client_cpu_s"]
                    )
                    if measured["errors"] and len(first_errors) < 3:
                        first_errors.append(f"{label} {key}: {measured['errors'][0]} ({len(measured['errors'])})")
                    measured["errors"] = len(measured["errors"])
                    windows[label].setdefault(key, []).append(measured)
    finally:
        for channel in channels.values():
            await channel.close()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "windows": windows,
        "first_errors": first_errors,
        "load_before": " ".join(load_before),
        "load_after": " ".join(load_after),
    }


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"]:
        raise SystemExit("usage: python -m bench.grpcio_versions serve --kind generic|registered (or python -m bench)")
    serve_main(sys.argv[2:])
