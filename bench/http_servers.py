"""http_servers: the same KServe v2 REST infer on aiohttp's server and on Starlette + uvicorn.

Issue 20 (KServe v2 over HTTP/REST in the daemon) asks for a well-kept asyncio HTTP server on
the daemon's own loop, chosen by measurement: calls/s and CPU per call for the same infer. This
measures the two candidates as the daemon would embed them:

- aiohttp: `aiohttp.web`, an `AppRunner` + `TCPSite` started on the already running loop,
  `client_max_size` as the body cap;
- starlette: a Starlette app (`max_body_size` as the body cap) on `uvicorn.Server(Config(...,
  loop="none", http="httptools", lifespan="off", log_config=None)).serve()` as a task on the
  already running loop, with uvicorn's signal handling turned off (see `EmbeddedUvicorn`).

Each server is a process of its own (`python -m bench.http_servers serve --library NAME`) on
uvloop, 127.0.0.1 port 0, reporting its port on stdout, and serves the same two routes with one
handler per library around the same function (`infer_reply`, stdlib json), so only the HTTP
library differs:

- POST /v2/models/{name}/infer: a JSON body (`{"inputs":[{"name":"x","datatype":"FP32",
  "shape":[16],"data":[...]}]}`), answered with the tensor echoed as a JSON output; or Triton's
  binary extension (request header `Inference-Header-Content-Length: N`, the body N bytes of
  JSON whose input says `"parameters":{"binary_data_size":64}`, then the 64 raw bytes),
  answered the same way (a JSON header whose output has `binary_data_size`, then the bytes;
  response header `Inference-Header-Content-Length`);
- GET /v2/health/ready: 200.

One load generator (a child process on uvloop) drives every server the same way: one keep-alive
HTTP/1.1 connection per call in flight, the request bytes built once, each reply parsed by
httptools' response parser and compared with the expected bytes (`infer_reply` run locally). That
costs about half the CPU per call of a client library (once, on a busy 2-core host, at 8 in
flight: 77 us against aiohttp's ClientSession's 152 us, as much as a server's), so the servers,
not the client, set calls/s.

Interleaved rounds: per round, per cell (body: binary or JSON; 1, 8 and 32 calls in flight),
every server in turn (the starting one rotating each round), each with fresh connections, an
uncounted warm-up window, then a measured one bounded by time and calls. A control: a second
Starlette server process, measured like the others, so the spread of its ratio to the first is
the noise of the run.

Reported per cell and server: calls/s, p50 latency and the **server's CPU per call** (its
/proc/PID/stat utime+stime over the measured window / the calls answered), medians over rounds
[min-max], and aiohttp / starlette for CPU per call and calls/s: the median over rounds of the
ratio within a round [range]. Then the same ratios over all cells, which library wins on CPU
per call, and what each server does at its limits (a body over the cap announced by
Content-Length alone, a 64 KiB header). Failed calls: target 0. Every window's figures go to
bench/results/http_servers.json.

Needs aiohttp, starlette (with `max_body_size`: 1.x), uvicorn (0.29 or later: `capture_signals`),
httptools and uvloop in the venv; run() says which are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import select
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from bench.common import Context

BENCHMARK = "http_servers"
REPO = Path(__file__).resolve().parent.parent
AIOHTTP = "aiohttp"
STARLETTE = "starlette"
LIBRARIES = (AIOHTTP, STARLETTE)
CONTROL = f"{STARLETTE} again"  # the baseline's second server process: the noise floor
BASELINE = STARLETTE  # ratios are aiohttp / starlette
PACKAGES = ("aiohttp", "starlette", "uvicorn", "httptools", "uvloop")
MODEL = "echo"
HEADER = "Inference-Header-Content-Length"
BINARY = "binary"
JSON_BODY = "json"
BODIES = (BINARY, JSON_BODY)
ELEMENTS = 16  # one FP32 [16] tensor: 64 bytes raw, deployd's small Invoke
ITEM_SIZES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "FP16": 2, "INT32": 4, "FP32": 4, "INT64": 8, "FP64": 8}
MAX_BODY_BYTES = 64 * 1024 * 1024  # the cap on a request body, the same for both servers
SERVER_LIFETIME_S = 900.0
CALL_TIMEOUT_S = 30.0  # a window's calls must all be answered this long after it ends
MIN_WINDOW_CALLS = 20  # fewer calls in a window say nothing about CPU per call: left out
BIG_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Params:
    rounds: int
    window_seconds: float
    warmup_seconds: float  # before every measured window, uncounted
    max_calls: int  # per window, all connections together
    levels: tuple[int, ...]  # calls in flight
    control: bool  # a second starlette server
    probe_seconds: float  # how long a limit probe waits for an answer


FULL = Params(
    rounds=12,
    window_seconds=0.5,
    warmup_seconds=0.15,
    max_calls=50000,
    levels=(1, 8, 32),
    control=True,
    probe_seconds=3,
)
SMOKE = Params(
    rounds=1, window_seconds=0.2, warmup_seconds=0.05, max_calls=300, levels=(1, 8, 32), control=False, probe_seconds=1
)


def cells(levels: tuple[int, ...]) -> list[tuple[str, int]]:
    """(body, calls in flight) measured in each round, in order."""
    return [(body, level) for body in BODIES for level in levels]


# ---------------------------------------------------------------------------- the v2 work (both servers)


class InferError(ValueError):
    """A request the echo model cannot answer: 400."""


def tensor_of(request: Any) -> dict[str, Any]:
    inputs = request["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InferError("the echo model takes exactly one input")
    tensor: dict[str, Any] = inputs[0]
    if not isinstance(tensor["shape"], list) or not all(isinstance(size, int) for size in tensor["shape"]):
        raise InferError("shape must be a list of integers")
    return tensor


def echo_json(model: str, body: bytes) -> bytes:
    tensor = tensor_of(json.loads(body))
    data = tensor["data"]
    if not isinstance(data, list) or len(data) != math.prod(tensor["shape"]):
        raise InferError(f"data has {len(data)} elements, shape {tensor['shape']} needs {math.prod(tensor['shape'])}")
    output = {"name": tensor["name"], "datatype": tensor["datatype"], "shape": tensor["shape"], "data": data}
    return json.dumps({"model_name": model, "outputs": [output]}, separators=(",", ":")).encode()


def echo_binary(model: str, body: bytes, header_length: str) -> tuple[bytes, int]:
    """Triton's binary extension: the reply and the length of its JSON header."""
    length = int(header_length)
    if not 0 < length <= len(body):
        raise InferError(f"{HEADER} {length} is outside the body's {len(body)} bytes")
    tensor = tensor_of(json.loads(body[:length]))
    raw = body[length:]
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    expected = math.prod(tensor["shape"]) * ITEM_SIZES.get(tensor["datatype"], 0)
    if size != len(raw) or size != expected:
        raise InferError(f"binary_data_size {size}, {len(raw)} bytes sent, {expected} needed")
    output = {
        "name": tensor["name"],
        "datatype": tensor["datatype"],
        "shape": tensor["shape"],
        "parameters": {"binary_data_size": len(raw)},
    }
    header = json.dumps({"model_name": model, "outputs": [output]}, separators=(",", ":")).encode()
    return header + raw, len(header)


def infer_reply(model: str, body: bytes, header_length: str | None) -> tuple[int, bytes, dict[str, str]]:
    """All the v2 work of one infer, the same under every library: status, body, headers."""
    try:
        if header_length is None:
            return 200, echo_json(model, body), {"Content-Type": "application/json"}
        payload, length = echo_binary(model, body, header_length)
        return 200, payload, {"Content-Type": "application/octet-stream", HEADER: str(length)}
    except (ValueError, KeyError, TypeError) as error:  # json's errors are ValueErrors
        return 400, json.dumps({"error": str(error)}).encode(), {"Content-Type": "application/json"}


# ---------------------------------------------------------------------------- the servers (children)

Ready = Callable[[int], None]


async def serve_aiohttp(ready: Ready, stop: asyncio.Event) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()  # 413 past client_max_size
        status, payload, headers = infer_reply(request.match_info["name"], body, request.headers.get(HEADER))
        return web.Response(status=status, body=payload, headers=headers)

    async def health_ready(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_get("/v2/health/ready", health_ready)
    # handle_signals=False (the default): the daemon keeps its own signal handlers.
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ready(runner.addresses[0][1])
        await stop.wait()
    finally:
        await runner.cleanup()


async def serve_starlette(ready: Ready, stop: asyncio.Event) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    class EmbeddedUvicorn(uvicorn.Server):
        """uvicorn.Server for a process that owns its signals.

        Server.serve() wraps everything in capture_signals(): it replaces the SIGINT and SIGTERM
        handlers with signal.signal (not the loop's add_signal_handler), stops serving on its own
        at the first signal, then restores the old handlers and raises each captured signal again.
        Under a daemon that took SIGTERM with loop.add_signal_handler, the daemon's handler still
        runs (the loop's wake-up fd sees the signal) and then runs a second time when uvicorn
        re-raises it: one SIGTERM reads as two, the second being the fast path, and uvicorn has
        meanwhile stopped without waiting for the daemon's shutdown order (checked with uvicorn
        0.55 on uvloop and on asyncio's loop). So the daemon turns it off and stops the server
        itself, by setting should_exit.
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    async def infer(request: Request) -> Response:
        body = await request.body()  # 413 past max_body_size
        status, payload, headers = infer_reply(request.path_params["name"], body, request.headers.get(HEADER))
        return Response(payload, status_code=status, headers=headers)

    async def health_ready(request: Request) -> Response:
        return Response()

    app = Starlette(
        routes=[
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/v2/health/ready", health_ready, methods=["GET"]),
        ],
        max_body_size=MAX_BODY_BYTES,
    )
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        loop="none",  # serve() runs on the caller's loop; the setting only matters to run()
        http="httptools",
        ws="none",
        lifespan="off",
        log_level="warning",
        log_config=None,  # no logging.config.dictConfig over the daemon's logging
        access_log=False,
        proxy_headers=False,  # no proxy in front: no X-Forwarded-* rewriting per request
        timeout_graceful_shutdown=5,
    )
    server = EmbeddedUvicorn(config)
    task = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + 30
        while not server.started and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if not server.started:
            raise RuntimeError("uvicorn did not start")
        ready(server.servers[0].sockets[0].getsockname()[1])
        await asyncio.wait({task, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


SERVERS: dict[str, Callable[[Ready, asyncio.Event], Awaitable[None]]] = {
    AIOHTTP: serve_aiohttp,
    STARLETTE: serve_starlette,
}


async def serve(library: str, lifetime: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.call_later(lifetime, stop.set)

    def ready(port: int) -> None:
        info = {"port": port, "library": library, "loop": type(loop).__module__}
        print(json.dumps(info), flush=True)

    await SERVERS[library](ready, stop)


def serve_main(argv: list[str]) -> None:
    import uvloop

    parser = argparse.ArgumentParser(prog="python -m bench.http_servers serve")
    parser.add_argument("--library", choices=LIBRARIES, required=True)
    parser.add_argument("--lifetime", type=float, default=SERVER_LIFETIME_S, help="stop after this many seconds")
    options = parser.parse_args(argv)
    signal.alarm(int(options.lifetime) + 60)  # dies on its own even if the supervisor is gone
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(options.library, options.lifetime))


# ---------------------------------------------------------------------------- supervisor


class Server:
    """One server process; `with` starts it and reads its port, leaving stops it by pid."""

    def __init__(self, label: str, library: str) -> None:
        self.label, self.library = label, library
        self.process: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> Server:
        from bench.common import BenchError, python_command

        command = python_command("-m", "bench.http_servers", "serve", "--library", self.library)
        self.process = subprocess.Popen(
            [*command, "--lifetime", str(SERVER_LIFETIME_S)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60.0)
        line = self.process.stdout.readline() if ready else ""
        try:
            self.info = json.loads(line)
            int(self.info["port"])
        except (ValueError, KeyError):
            self.__exit__()
            raise BenchError(f"the {self.label} server did not report its port (its stderr is above)") from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        from bench.common import stop_process

        if self.process is not None:
            stop_process(self.process)
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None


def versions() -> dict[str, str]:
    return {package: metadata.version(package) for package in PACKAGES}


def run(ctx: Context) -> None:
    from bench.common import RESULTS_DIR, BenchError, run_in_child

    missing = [package for package in PACKAGES if importlib.util.find_spec(package) is None]
    if missing:
        raise BenchError(
            f"the http_servers benchmark needs {', '.join(missing)}: pip install aiohttp starlette uvicorn httptools"
        )
    params = SMOKE if ctx.smoke else FULL
    labels = [AIOHTTP, STARLETTE, *([CONTROL] if params.control else [])]
    library_of = {AIOHTTP: AIOHTTP, STARLETTE: STARLETTE, CONTROL: STARLETTE}
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(Server(label, library_of[label])) for label in labels]
        targets = [{"label": server.label, "port": server.info["port"], "pid": server.pid} for server in servers]
        spec = {"targets": targets, **asdict(params)}
        windows = params.rounds * len(labels) * len(cells(params.levels))
        timeout = 120 + windows * (params.window_seconds + params.warmup_seconds + 5)
        result = run_in_child(f"bench.http_servers:{side_by_side.__name__}", spec, timeout)
        loop = servers[0].info["loop"]
    if not ctx.smoke:  # every window's figures, for a second look
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / f"{BENCHMARK}.json").write_text(json.dumps({"spec": spec, "versions": versions(), **result}))
    report(ctx, result, params, labels, loop, time.monotonic() - started)


def spread(values: list[float], digits: int = 0) -> str:
    """'median [min-max]' of per-round values, leaving out the NaNs of starved windows."""
    values = [value for value in values if not math.isnan(value)]
    if not values:
        return "n/a"
    text = f"{statistics.median(values):.{digits}f}"
    return text + (f" [{min(values):.{digits}f}-{max(values):.{digits}f}]" if len(values) > 1 else "")


def median_of(values: list[float]) -> float:
    values = [value for value in values if not math.isnan(value)]
    return statistics.median(values) if values else math.nan


def report(ctx: Context, result: dict[str, Any], params: Params, labels: list[str], loop: str, took: float) -> None:
    from bench.common import Samples, paired_ratios, percentile, ratio

    found = ", ".join(f"{package} {version}" for package, version in versions().items())
    what = "smoke" if ctx.smoke else f"{params.rounds} rounds"
    ctx.report.line(
        f"http_servers: the same KServe v2 REST infer (echo of FP32 [{ELEMENTS}], stdlib json) on aiohttp.web and"
        f" on Starlette + uvicorn (httptools), each embedded in a {loop} loop of its own process; {found};"
        f" {what}, {params.window_seconds:g} s windows, {took:.0f} s; medians over rounds [min-max];"
        f" ratio = server / {BASELINE}, median of the per-round ratios [range]"
    )
    compared = [label for label in labels if label != BASELINE]
    cpu_ratios: dict[str, list[float]] = {label: [] for label in compared}
    rate_ratios: dict[str, list[float]] = {label: [] for label in compared}
    cell_cpu_ratios: list[float] = []  # aiohttp / starlette, each cell's median
    failed = 0
    for body, level in cells(params.levels):
        key = f"{body}|{level}"
        rates: dict[str, list[float]] = {}
        cpus: dict[str, list[float]] = {}
        p50s: dict[str, list[float]] = {}
        ctx.report.line(f"http_servers: {body} body, {level} in flight:")
        ctx.report.line(
            f"http_servers:   {'server':>15}  {'calls/s':>17}  {'p50 ms':>17}  {'server CPU us/call':>18}"
            f"  {'CPU ratio':>17}  {'calls/s ratio':>17}"
        )
        for label in labels:
            windows = result["windows"][label][key]
            samples = Samples([(window["latencies"], window["seconds"]) for window in windows])
            ctx.report.add(samples.row(BENCHMARK, f"{label} {body}", level))
            enough = [len(window["latencies"]) >= min(MIN_WINDOW_CALLS, params.max_calls) for window in windows]
            rates[label] = [rate if ok else math.nan for rate, ok in zip(samples.rates(), enough, strict=True)]
            p50s[label] = [percentile(window["latencies"], 50) * 1000 for window in windows]
            cpus[label] = [
                ratio(window["server_cpu_s"], len(window["latencies"])) * 1e6 if ok else math.nan
                for window, ok in zip(windows, enough, strict=True)
            ]
            failed += sum(window["errors"] for window in windows)
        for label in labels:
            cpu_text = rate_text = "-"
            if label != BASELINE:
                cpu_ratio = paired_ratios(cpus[label], cpus[BASELINE])
                rate_ratio = paired_ratios(rates[label], rates[BASELINE])
                cpu_ratios[label].extend(cpu_ratio)
                if label == AIOHTTP:
                    cell_cpu_ratios.append(median_of(cpu_ratio))
                rate_ratios[label].extend(rate_ratio)
                cpu_text, rate_text = spread(cpu_ratio, 2) + "x", spread(rate_ratio, 2) + "x"
            ctx.report.line(
                f"http_servers:   {label:>15}  {spread(rates[label]):>17}  {spread(p50s[label], 3):>17}"
                f"  {spread(cpus[label]):>18}  {cpu_text:>17}  {rate_text:>17}"
            )
    everything = [window for by_key in result["windows"].values() for runs in by_key.values() for window in runs]
    others = [ratio(window["others_cpu_s"], window["seconds"]) * 100 for window in everything]
    client = [ratio(window["client_cpu_s"], len(window["latencies"])) * 1e6 for window in everything]
    ctx.report.line(
        f"http_servers: other processes' CPU during the measured windows {spread(others)} % of one core (load"
        f" average {result['load_before']} before, {result['load_after']} after); the load generator's CPU per"
        f" call {spread(client)} us"
    )
    for label in compared:
        ctx.report.line(
            f"http_servers: {label} / {BASELINE}, all cells and rounds: server CPU per call"
            f" {spread(cpu_ratios[label], 2)}x, calls/s {spread(rate_ratios[label], 2)}x"
        )
    verdict(ctx, cpu_ratios, cell_cpu_ratios)
    for label, probes in result["probes"].items():
        ctx.report.line(f"http_servers: {label} at its limits: {'; '.join(probes)}")
    for message in result["first_errors"]:
        ctx.report.line(f"http_servers: a failed call: {message}")
    ctx.report.check("http_servers: calls failed", failed, "<=", 0, "calls")


def verdict(ctx: Context, cpu_ratios: dict[str, list[float]], cell_cpu_ratios: list[float]) -> None:
    """Which library costs less CPU per call, against the control's spread where there is one.

    A difference counts as beyond the noise when aiohttp's median ratio lies outside the middle
    half (quartiles) of the control's per-round ratios, which measure nothing but the noise.
    """
    ratios = [value for value in cpu_ratios[AIOHTTP] if not math.isnan(value)]
    if not ratios:
        ctx.report.line("http_servers: no verdict on CPU per call (no window had enough calls)")
        return
    median = statistics.median(ratios)
    below = sum(1 for value in ratios if value < 1)
    noise = ""
    control = [value for value in cpu_ratios.get(CONTROL, []) if not math.isnan(value)]
    if len(control) > 1:
        low, _, high = statistics.quantiles(control, n=4)
        beyond = not low <= median <= high
        noise = (
            f"; the control's ratio ({CONTROL} / {STARLETTE}) has quartiles {low:.2f}-{high:.2f}x and is below 1 in"
            f" {sum(1 for value in control if value < 1)} of {len(control)}, so this is"
            f" {'beyond' if beyond else 'within'} the noise of the run"
        )
    if round(median, 2) == 1:
        winner = "neither (1.00x)"
    else:
        winner = (
            f"{AIOHTTP}, {median:.2f}x {STARLETTE}'s" if median < 1 else f"{STARLETTE}, {1 / median:.2f}x {AIOHTTP}'s"
        )
    cheaper = sum(1 for value in cell_cpu_ratios if value < 1)
    ctx.report.line(
        f"http_servers: less server CPU per call: {winner} (median of all cells' per-round ratios); aiohttp is"
        f" cheaper in {below} of {len(ratios)} cell-rounds and in {cheaper} of {len(cell_cpu_ratios)} cells'"
        f" medians{noise}"
    )


# ---------------------------------------------------------------------------- load generator (child)


def tensor_values() -> list[float]:
    """ELEMENTS float32 values (exact as Python floats), the same every run."""
    values = [(index * 0.6180339887) % 1.0 for index in range(1, ELEMENTS + 1)]
    return list(struct.unpack(f"<{ELEMENTS}f", struct.pack(f"<{ELEMENTS}f", *values)))


def request_body(body: str) -> tuple[bytes, str | None]:
    """The body of one infer, and its Inference-Header-Content-Length (binary only)."""
    values = tensor_values()
    tensor: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": [ELEMENTS]}
    if body == JSON_BODY:
        payload = {"inputs": [{**tensor, "data": values}]}
        return json.dumps(payload, separators=(",", ":")).encode(), None
    raw = struct.pack(f"<{ELEMENTS}f", *values)
    payload = {"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]}
    header = json.dumps(payload, separators=(",", ":")).encode()
    return header + raw, str(len(header))


def http_request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, length: int = -1
) -> bytes:
    """The bytes of one HTTP/1.1 request; a POST's Content-Length is len(body) unless length says otherwise."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if method == "POST":
        lines.append(f"Content-Length: {len(body) if length < 0 else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


Reply = tuple[int, bytes, bytes | None]  # status, body, Inference-Header-Content-Length


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with one request at a time; httptools parses the replies."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.parse_error = httptools.HttpParserError
        self.transport: asyncio.Transport | None = None
        self.reply: asyncio.Future[Reply] | None = None
        self.chunks: list[bytes] = []
        self.header_length: bytes | None = None

    @classmethod
    async def open(cls, port: int) -> Connection:
        _, connection = await asyncio.get_running_loop().create_connection(cls, "127.0.0.1", port)
        return connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self.parse_error as error:
            self.fail(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.fail(exc or ConnectionResetError("the server closed the connection"))

    def fail(self, error: BaseException) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(error)

    # httptools' callbacks
    def on_message_begin(self) -> None:
        self.chunks = []
        self.header_length = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"inference-header-content-length":
            self.header_length = value

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_result((self.parser.get_status_code(), b"".join(self.chunks), self.header_length))

    def call(self, request: bytes) -> asyncio.Future[Reply]:
        if self.transport is None:
            raise ConnectionResetError("the connection is closed")
        self.reply = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.reply

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def side_by_side(spec: dict[str, Any]) -> dict[str, Any]:
    """Every server, every cell, interleaved rounds; returns each window's latencies and CPU."""
    from server.app import eventloop

    return eventloop.run(_side_by_side(spec))


async def window(
    port: int, connections: list[Connection], request: bytes, expected: Reply, seconds: float, max_calls: int
) -> dict[str, Any]:
    """One window: each connection sends the request back to back; latencies of the right answers."""
    latencies: list[float] = []
    errors: list[str] = []
    begun = 0
    deadline = time.perf_counter() + seconds

    async def caller(index: int) -> None:
        nonlocal begun
        while begun < max_calls and time.perf_counter() < deadline:
            begun += 1
            started = time.perf_counter()
            try:
                reply = await connections[index].call(request)
            except Exception as error:  # counted, not fatal; a fresh connection for the next call
                errors.append(f"{type(error).__name__}: {error}")
                connections[index].close()
                try:
                    connections[index] = await Connection.open(port)
                except OSError as reconnect:
                    errors.append(f"reconnecting: {type(reconnect).__name__}: {reconnect}")
                    return
                continue
            if reply != expected:
                errors.append(f"answered {reply[0]} {reply[1][:200]!r}")
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(caller(index) for index in range(len(connections)))), seconds + CALL_TIMEOUT_S
        )
    except TimeoutError:
        errors.append(f"calls unanswered {seconds + CALL_TIMEOUT_S:g} s after the window began")
    return {"latencies": latencies, "seconds": time.perf_counter() - started, "errors": errors}


async def probe(port: int, request: bytes, seconds: float) -> str:
    """What the server answers to one request on a fresh connection, within `seconds`."""
    connection = await Connection.open(port)
    try:
        status, body, _ = await asyncio.wait_for(connection.call(request), seconds)
        return f"{status} {body[:60].decode('latin-1', 'replace').strip()!r}"
    except TimeoutError:
        return f"no answer in {seconds:g} s"
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    finally:
        connection.close()


async def limits(port: int, seconds: float) -> list[str]:
    """The server at its limits: a body over the cap (headers alone), a big header, a bad body."""
    path = f"/v2/models/{MODEL}/infer"
    body, _ = request_body(JSON_BODY)
    over = http_request(port, "POST", path, length=MAX_BODY_BYTES + 1)
    big = http_request(port, "POST", path, body, {"X-Big": "x" * BIG_HEADER_BYTES})
    bad = http_request(port, "POST", path, b"{nope")
    return [
        f"Content-Length {MAX_BODY_BYTES + 1} (over the cap), headers only: {await probe(port, over, seconds)}",
        f"a {BIG_HEADER_BYTES // 1024} KiB header: {await probe(port, big, seconds)}",
        f"a body that is not JSON: {await probe(port, bad, seconds)}",
    ]


async def _side_by_side(spec: dict[str, Any]) -> dict[str, Any]:
    from bench.grpcio_versions import machine_busy_seconds
    from bench.v2load import cpu_seconds

    targets = {target["label"]: target for target in spec["targets"]}
    labels = list(targets)
    requests: dict[tuple[str, str], bytes] = {}
    expected: dict[str, Reply] = {}
    for body in BODIES:
        payload, header_length = request_body(body)
        status, answer, headers = infer_reply(MODEL, payload, header_length)
        if status != 200:
            raise RuntimeError(f"the {body} request is wrong: {answer!r}")
        length = headers.get(HEADER)
        expected[body] = (status, answer, None if length is None else length.encode())
        content_type = "application/json" if header_length is None else "application/octet-stream"
        extra = {"Content-Type": content_type, **({} if header_length is None else {HEADER: header_length})}
        for label, target in targets.items():
            requests[(label, body)] = http_request(target["port"], "POST", f"/v2/models/{MODEL}/infer", payload, extra)
    for label, target in targets.items():  # ready, and each body answered right, before any timing
        connection = await Connection.open(target["port"])
        try:
            ready = await asyncio.wait_for(connection.call(http_request(target["port"], "GET", "/v2/health/ready")), 30)
            if ready[0] != 200:
                raise RuntimeError(f"{label}: GET /v2/health/ready answered {ready[0]}")
            for body in BODIES:
                reply = await asyncio.wait_for(connection.call(requests[(label, body)]), 30)
                if reply != expected[body]:
                    raise RuntimeError(f"{label}: the {body} infer answered {reply!r}, not {expected[body]!r}")
        finally:
            connection.close()

    windows: dict[str, dict[str, list[dict[str, Any]]]] = {label: {} for label in labels}
    first_errors: list[str] = []
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    for round_index in range(spec["rounds"]):
        turn = round_index % len(labels)
        order = labels[turn:] + labels[:turn]  # A B C, B C A, ...: no server always first
        for body, level in cells(tuple(spec["levels"])):
            key = f"{body}|{level}"
            for label in order:
                port, pid = targets[label]["port"], targets[label]["pid"]
                connections = [await Connection.open(port) for _ in range(level)]
                try:
                    args = (port, connections, requests[(label, body)], expected[body])
                    await window(*args, spec["warmup_seconds"], spec["max_calls"])
                    busy, server_cpu, client_cpu = machine_busy_seconds(), cpu_seconds([pid]), time.process_time()
                    measured = await window(*args, spec["window_seconds"], spec["max_calls"])
                    measured["server_cpu_s"] = cpu_seconds([pid]) - server_cpu
                    measured["client_cpu_s"] = time.process_time() - client_cpu
                    # what everything else on the machine used meanwhile: the noise of this window
                    measured["others_cpu_s"] = (
                        machine_busy_seconds() - busy - measured["server_cpu_s"] - measured["client_cpu_s"]
                    )
                finally:
                    for connection in connections:
                        connection.close()
                if measured["errors"] and len(first_errors) < 3:
                    first_errors.append(f"{label} {key}: {measured['errors'][0]} ({len(measured['errors'])})")
                measured["errors"] = len(measured["errors"])
                windows[label].setdefault(key, []).append(measured)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    probes = {
        label: await limits(target["port"], spec["probe_seconds"])
        for label, target in targets.items()
        if label != CONTROL
    }
    return {
        "windows": windows,
        "probes": probes,
        "first_errors": first_errors,
        "load_before": " ".join(load_before),
        "load_after": " ".join(load_after),
    }


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"]:
        raise SystemExit("usage: python -m bench.http_servers serve --library aiohttp|starlette (or python -m bench)")
    serve_main(sys.argv[2:])
