"""Swaps: serve a name's next version again and again. A swap must give back what the version
it replaced took.

A client child alternates two builds of a nn.Linear of `width` (16 MB of weights in the full
run; the builds differ only in the tag they answer): every swap streams the next build's
package, loads its pickle under one name (the previous version has no call running, so it
is unloaded at once), calls the name on every worker (each call must answer the new tag)
and unloads the previous package, so that one package and one object stay loaded. `swaps`
times, against a daemon with 2 workers, reading /proc for the daemon and each worker after
every swap (bench.churn's readings). Printed: how much each process's RSS grew (KB/swap,
from the end of the first swap to the end of the last), the ratio of RSS after the last
swap to after the first (target <= 1.10), deleted deployd segments still mapped in a
worker after the last swap (target 0), and the fds and /dev/shm segments gained from the
first swap to the last (target 0).

Twice: through the daemon, and with data ports (pool.data_ports), where every swap also sends
each worker the new routes and the calls go to the workers' own ports.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.churn import KB, readings
from bench.common import MIB, Context, Daemon, Row, build_packages, run_in_child

WORKERS = 2
NAME = "swaps-bench"
TAGS = ("a", "b")


@dataclass(frozen=True)
class Params:
    swaps: int
    width: int


FULL = Params(swaps=200, width=2048)  # 4 * 2048 * 2049 bytes: 16.8 MB of weights
SMOKE = Params(swaps=5, width=64)


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    specs = {f"swap_{tag}": {"kind": "big", "width": params.width, "layers": 1, "label": tag} for tag in TAGS}
    packages = build_packages(ctx.workdir / "packages", specs)
    for path, env in (("", {}), ("direct", {"DEPLOYD_POOL_DATA_PORTS": "0"})):
        with Daemon(ctx.workdir, WORKERS, env=env) as daemon:
            child_spec = {
                "target": daemon.target,
                "daemon_pid": daemon.pid,
                "packages": [str(packages[f"swap_{tag}"]) for tag in TAGS],
                **asdict(params),
            }
            result = run_in_child("bench.swaps:swap_call_unload", child_spec, timeout=120 + 5 * params.swaps)
        report(ctx, result, params, path)


def report(ctx: Context, result: dict[str, Any], params: Params, path: str) -> None:
    weights = 4 * params.width * (params.width + 1)  # float32 weight and bias
    label = f"swaps ({path})" if path else "swaps"
    swaps, latencies = result["swaps"], result["latencies"]
    ctx.report.add(Row.from_samples("swaps", f"deployd-{path}" if path else "deployd", 1, latencies, sum(latencies)))
    ctx.report.line(
        f"{label}: {swaps} hot swaps of a name, nn.Linear({params.width}, {params.width}) ="
        f" {weights / KB:,.0f} KB of weights, {WORKERS} workers: {sum(latencies) / swaps * 1000:.0f} ms a swap"
        f" (stream the package, load_pickle(name=), a call on each worker, unload the previous package)"
    )
    first, last = result["after_first"], result["after_last"]
    for who in first["rss"]:
        start, end = first["rss"][who], last["rss"][who]
        per_swap = (end - start) / KB / max(swaps - 1, 1)
        ctx.report.line(
            f"{label}: {who} RSS {start / MIB:.1f} MiB after the first swap, {end / MIB:.1f} MiB after the last:"
            f" {per_swap:+.1f} KB/swap"
        )
        ctx.report.check(f"{label}: {who} RSS after the last swap / after the first", end / start, "<=", 1.1)
    deleted = last["deleted_maps"]
    ctx.report.check(f"{label}: deleted deployd segments still mapped in workers", deleted, "<=", 0, "maps")
    for what, unit in (("daemon fds", "fds"), ("worker fds", "fds"), ("shm segments", "segments")):
        key = what.replace(" ", "_")
        ctx.report.line(f"{label}: {what} after the first swap / after the last: {first[key]} / {last[key]}")
        ctx.report.check(
            f"{label}: {what} gained from the first swap to the last", last[key] - first[key], "<=", 0, unit
        )


# ---------------------------------------------------------------------------- client (child)


def swap_call_unload(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: the swaps, with /proc read after each. Returns the readings."""
    import torch

    from client import InterpreterManager

    daemon_pid = spec["daemon_pid"]
    x = torch.ones(1, spec["width"])
    builds = [Path(path).read_bytes() for path in spec["packages"]]  # read once, sent every swap
    latencies: list[float] = []
    with InterpreterManager(spec["target"], timeout=120) as manager:
        pids = [worker.pid for worker in manager.status().workers]
        model = manager.model(NAME)
        previous = None
        after_first = after_last = readings(daemon_pid, pids)
        for swap in range(spec["swaps"]):
            tag = TAGS[swap % 2]
            started = time.perf_counter()
            package = manager.load_package(builds[swap % 2])
            loaded = package.load_pickle("model", "model.pkl", name=NAME)
            called = {model.call_method("forward_pid", x) for _ in range(4 * len(pids))}
            answers = {model.call_method("tag") for _ in range(2 * len(pids))}
            if previous is not None:
                previous.unload()
            previous = package
            latencies.append(time.perf_counter() - started)
            check_swap(manager, swap, loaded.version, called, answers, tag, pids)
            after_last = readings(daemon_pid, pids)
            if swap == 0:
                after_first = after_last
        model.unload()
        if previous is not None:
            previous.unload()
    return {"swaps": spec["swaps"], "latencies": latencies, "after_first": after_first, "after_last": after_last}


def check_swap(
    manager: Any, swap: int, version: int, called: set[int], answers: set[str], tag: str, pids: list[int]
) -> None:
    """The swap made the next version, every worker ran it, and only it stays loaded."""
    if version != swap + 1:
        raise AssertionError(f"swap {swap}: made version {version}, not {swap + 1}")
    if called != set(pids):
        raise AssertionError(f"swap {swap}: calls reached workers {sorted(called)}, not all of {pids}")
    if answers != {tag}:
        raise AssertionError(f"swap {swap}: answers {sorted(answers)}, expected only {tag!r}")
    status = manager.status()
    if [worker.pid for worker in status.workers] != pids:
        raise AssertionError(f"swap {swap}: a worker was replaced")
    if (len(status.packages), len(status.objects)) != (1, 1):
        raise AssertionError(f"swap {swap}: {len(status.packages)} packages, {len(status.objects)} objects loaded")
