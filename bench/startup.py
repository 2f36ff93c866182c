"""Start: how long a pool is short of a worker after one dies.

A client process SIGKILLs a worker (its pid from manager.status()) and measures the time
from the kill until the replacement serves the loaded model: manager.status() shows a new
pid idle in that slot, and a call that reports its pid (bench.models.Identity.pid) runs
on it. That includes noticing the death, the daemon's restart delay, forking from the
fork server and replaying the loaded package and object into the new worker.

First deaths: each slot of a fresh daemon is killed once (several daemons for more
samples), target p50 <= 200 ms. Repeated deaths: one slot killed again as soon as its
replacement serves, which shows any backoff between restarts (reported, no target).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from bench.common import Context, Daemon, Row, build_packages, percentile, run_in_child

FIRST = "deployd-first-death"
REPEATED = "deployd-repeated-death"


@dataclass(frozen=True)
class Params:
    daemons: int  # fresh daemons, each of whose slots is killed once
    repeated_kills: int  # kills of one slot in a row, on the last daemon


FULL = Params(daemons=4, repeated_kills=3)
SMOKE = Params(daemons=1, repeated_kills=1)


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    package = str(build_packages(ctx.workdir / "packages", {"identity": {"kind": "identity"}})["identity"])
    first: list[dict[str, float]] = []
    repeated: list[dict[str, float]] = []
    for index in range(params.daemons):
        again = params.repeated_kills if index == params.daemons - 1 else 0
        result = kill_on_fresh_daemon(ctx, package, again)
        first += result["first"]
        repeated += result["repeated"]
    report(ctx, FIRST, first)
    if repeated:
        report(ctx, REPEATED, repeated)
    report_targets(ctx, first, repeated)


def kill_on_fresh_daemon(ctx: Context, package: str, repeated: int) -> dict[str, Any]:
    with Daemon(ctx.workdir, ctx.cpu_count) as daemon:
        spec = {"target": daemon.target, "package": package, "slots": ctx.cpu_count, "repeated": repeated}
        return dict(run_in_child("bench.startup:kill_workers", spec, timeout=300))


def report(ctx: Context, strategy: str, samples: list[dict[str, float]]) -> None:
    latencies = [sample["serving"] for sample in samples]
    ctx.report.add(Row.from_samples("start", strategy, ctx.cpu_count, latencies, sum(latencies)))


def report_targets(ctx: Context, first: list[dict[str, float]], repeated: list[dict[str, float]]) -> None:
    serving = [sample["serving"] * 1000 for sample in first]
    idle = [sample["idle"] * 1000 for sample in first]
    what = f"start: worker death -> replacement serving, p50 of {len(serving)}"
    ctx.report.check(what, percentile(serving, 50), "<=", 200, unit="ms")
    ctx.report.line(f"start: worker death -> status shows the replacement idle, p50 = {percentile(idle, 50):.1f} ms")
    if repeated:
        shown = ", ".join(f"{sample['serving'] * 1000:.0f}" for sample in repeated)
        ctx.report.line(f"start: one slot killed {len(repeated)} times in a row: {shown} ms (restart backoff)")


# ---------------------------------------------------------------------------- client (child)


def kill_workers(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: kill each slot once, then one slot `repeated` times in a row."""
    from client import InterpreterManager

    with InterpreterManager(spec["target"], timeout=60) as manager:
        model = manager.load_package(spec["package"]).load_pickle("model", "model.pkl")
        model.call_method("pid")
        first = [replace_worker(manager, model, slot) for slot in range(spec["slots"])]
        repeated = [replace_worker(manager, model, 0) for _ in range(spec["repeated"])]
    return {"first": first, "repeated": repeated}


def replace_worker(manager: Any, model: Any, slot: int, timeout: float = 60.0) -> dict[str, float]:
    """SIGKILL the worker in slot; returns seconds until its replacement is idle, and serving."""
    victim = worker_in(manager, slot)["pid"]
    killed = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    deadline = killed + timeout
    replacement = wait_for_idle_replacement(manager, slot, victim, deadline)
    idle = time.perf_counter() - killed
    wait_for_call_on(model, replacement, deadline)
    return {"idle": idle, "serving": time.perf_counter() - killed}


def worker_in(manager: Any, slot: int) -> dict[str, Any]:
    worker = manager.status().workers[slot]
    return {"pid": worker.pid, "state": worker.state}


def wait_for_idle_replacement(manager: Any, slot: int, victim: int, deadline: float) -> int:
    """Poll status until slot has a new pid that is idle; returns that pid."""
    for _ in range(1_000_000):
        worker = worker_in(manager, slot)
        if worker["pid"] != victim and worker["state"] == "idle":
            return int(worker["pid"])
        if time.perf_counter() > deadline:
            break
        time.sleep(0.001)
    raise TimeoutError(f"no idle replacement for worker {slot} (pid {victim})")


def wait_for_call_on(model: Any, pid: int, deadline: float) -> None:
    """Call until a call runs on pid (idle workers take calls in turn, so this is soon)."""
    for _ in range(10_000):
        if model.call_method("pid") == pid:
            return
        if time.perf_counter() > deadline:
            break
    raise TimeoutError(f"no call reached the replacement worker (pid {pid})")
