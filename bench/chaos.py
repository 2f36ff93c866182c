"""Chaos: callers keep calling while workers are SIGKILLed from outside.

CALLERS client threads call an identity model on a 16-element tensor back to back for
`seconds`, through the public client with retries on (Retry(attempts=5)), while a killer
thread SIGKILLs a random worker every `kill_every` seconds. Printed: calls made, calls
failed (target with retries: 0), the longest stall (the slowest call, retries included),
and the resident memory of the daemon and of its workers, the daemon's open fds and the
deployd segments in /dev/shm, at the start and the end (target: flat, RSS end <= 1.1x
start, fds and segments no more than at the start, so a restart leaks nothing).

Twice: through the daemon, and on the direct path (pool.data_ports: the client calls the
workers' own ports, so a SIGKILL cuts its connection to that worker, and the replacement
comes back on the same port).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import Context, Daemon, Row, build_packages, run_in_child

CALLERS = 4
ELEMENTS = 16


@dataclass(frozen=True)
class Params:
    seconds: float
    kill_every: float


FULL = Params(seconds=60.0, kill_every=5.0)
SMOKE = Params(seconds=3.0, kill_every=1.0)


PATHS = {"daemon path": {}, "direct": {"DEPLOYD_POOL_DATA_PORTS": "0"}}


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    package = build_packages(ctx.workdir / "packages", {"identity": {"kind": "identity"}})["identity"]
    for path, env in PATHS.items():
        with Daemon(ctx.workdir, ctx.cpu_count, env=env) as daemon:
            spec = {"target": daemon.target, "daemon_pid": daemon.pid, "package": str(package), **asdict(params)}
            result = run_in_child("bench.chaos:callers_and_killer", spec, timeout=300 + params.seconds)
        report(ctx, path, result)


def report(ctx: Context, path: str, result: dict[str, Any]) -> None:
    name = "deployd-retry" if path == "daemon path" else "deployd-retry-direct"
    ctx.report.add(Row.from_samples("chaos", name, CALLERS, result["latencies"], result["elapsed"]))
    ctx.report.line(
        f"chaos ({path}): {CALLERS} callers for {result['elapsed']:.0f}s, {result['kills']} workers SIGKILLed:"
        f" {len(result['latencies'])} calls made, longest stall {max(result['latencies']) * 1000:.0f} ms"
    )
    for failure in result["failures"][:3]:
        ctx.report.line(f"chaos ({path}): a failed call: {failure}")
    ctx.report.check(f"chaos ({path}): calls failed, with client retries", result["failed"], "<=", 0, unit="calls")
    for who in ("daemon", "workers"):
        start, end = result["rss"][who]
        ctx.report.line(
            f"chaos ({path}): {who} RSS {start / 2**20:.0f} MiB at the start, {end / 2**20:.0f} MiB at the end"
        )
        ctx.report.check(f"chaos ({path}): {who} RSS end / start", end / start if start else 0.0, "<=", 1.1)
    for what, unit in (("daemon fds", "fds"), ("shm segments", "segments")):
        start, end = result["counts"][what]
        ctx.report.line(f"chaos ({path}): {what} {start} at the start, {end} at the end")
        ctx.report.check(f"chaos ({path}): {what} end - start", end - start, "<=", 0, unit=unit)


# ---------------------------------------------------------------------------- load and killer (child)


def callers_and_killer(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from client import InterpreterManager, Retry

    x = torch.arange(ELEMENTS, dtype=torch.float32)
    with InterpreterManager(spec["target"], timeout=60, retry=Retry(attempts=5)) as manager:
        model = manager.load_package(spec["package"]).load_pickle("model", "model.pkl")
        for _ in range(200):  # warm-up, so the start RSS is the steady state
            model(x)
        rss_start = rss_of(spec["daemon_pid"], manager)
        counts_start = fds_and_segments(spec["daemon_pid"])
        stop = threading.Event()
        latencies: list[list[float]] = [[] for _ in range(CALLERS)]
        failures: list[str] = []
        kills = [0]

        def caller(index: int) -> None:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    if not torch.equal(model(x), x):
                        failures.append("wrong result")
                except Exception as error:
                    failures.append(f"{type(error).__name__}: {error}")
                latencies[index].append(time.perf_counter() - started)

        def killer() -> None:
            while not stop.wait(spec["kill_every"]):
                pids = [worker.pid for worker in manager.status().workers if worker.state in ("idle", "busy")]
                if pids:
                    os.kill(random.choice(pids), signal.SIGKILL)
                    kills[0] += 1

        threads = [threading.Thread(target=caller, args=(index,)) for index in range(CALLERS)]
        threads.append(threading.Thread(target=killer))
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        time.sleep(spec["seconds"])
        stop.set()
        for thread in threads:
            thread.join(120)
        elapsed = time.perf_counter() - started
        # Let the last replacement settle before measuring the end state.
        for _ in range(100):
            if all(worker.state == "idle" for worker in manager.status().workers):
                break
            time.sleep(0.1)
        rss_end = rss_of(spec["daemon_pid"], manager)
        counts_end = fds_and_segments(spec["daemon_pid"])
    return {
        "latencies": [latency for per_caller in latencies for latency in per_caller],
        "elapsed": elapsed,
        "failed": len(failures),
        "failures": failures[:10],
        "kills": kills[0],
        "rss": {who: (rss_start[who], rss_end[who]) for who in rss_start},
        "counts": {what: (counts_start[what], counts_end[what]) for what in counts_start},
    }


def fds_and_segments(daemon_pid: int) -> dict[str, int]:
    """The daemon's open fds (each worker has its channel and its output pipe), and its
    shared-memory segments (each worker has its arenas: server.ipc.shm names them)."""
    try:
        fds = len(os.listdir(f"/proc/{daemon_pid}/fd"))
    except OSError:
        fds = 0
    segments = len([name for name in os.listdir("/dev/shm") if name.startswith(f"deployd-{daemon_pid}-")])
    return {"daemon fds": fds, "shm segments": segments}


def rss_of(daemon_pid: int, manager: Any) -> dict[str, int]:
    """Resident bytes of the daemon, and of its current workers together."""
    workers = [worker.pid for worker in manager.status().workers if worker.state not in ("stopped", "restarting")]
    return {"daemon": rss_bytes(daemon_pid), "workers": sum(rss_bytes(pid) for pid in workers)}


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
