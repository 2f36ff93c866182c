"""Unloading gives back what loading took: load, call, unload a 16 MB package, over and over.

Before the fix every cycle left the package's weights mapped in every worker (its
importer sat in a reference cycle that no collection ever reached), ~16 MB a cycle.
`python -m bench --only churn` runs the long version and prints the figures per cycle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from client import InterpreterManager
from tests.daemon_process import DaemonProcess

CYCLES = 20
WARM_UP = 3  # the daemon's first calls of each kind build caches that last: measure from here
WIDTH = 2048  # the churn package's nn.Linear(2048, 2048): 16 MB of weights


def test_unloading_releases_the_package_everywhere(fresh_daemon: DaemonProcess, package_dir: Path) -> None:
    data = (package_dir / "churn.pt").read_bytes()
    x = torch.ones(1, WIDTH)
    with InterpreterManager(fresh_daemon.target, timeout=60) as manager:
        workers = [worker.pid for worker in manager.status().workers]
        first: dict[str, Any] = {}
        for cycle in range(CYCLES):
            package = manager.load_package(data)
            model = package.load_pickle("churn", "model.pkl")
            for _ in range(2 * len(workers)):
                assert model(x).shape == (1, WIDTH)
            package.unload()
            if cycle == WARM_UP - 1:
                first = readings(fresh_daemon.pid, workers)
        last = readings(fresh_daemon.pid, workers)
        assert [worker.pid for worker in manager.status().workers] == workers, "a worker was replaced"
    assert last["deleted_segments_mapped"] == 0, "an unloaded package's weights are still mapped"
    for name, rss in last["rss"].items():
        # Each cycle used to leak its 16 MB in each worker: ~300 MB over 20 cycles.
        if name != "daemon":
            assert rss <= 1.1 * first["rss"][name], f"{name} RSS grew: {first['rss'][name]} -> {rss} bytes"
    # The daemon's heap swings by several MB from one cycle to the next (where glibc happens to
    # place the streamed chunks among long-lived objects), so 20 cycles cannot resolve a 10%
    # drift: this catches a package's bytes kept per cycle, and bench.churn's 200 cycles the rest.
    grown = last["rss"]["daemon"] - first["rss"]["daemon"]
    assert grown < len(data), f"daemon RSS grew by {grown} bytes over {CYCLES - WARM_UP} cycles"
    assert last["daemon_fds"] == first["daemon_fds"]
    assert last["worker_fds"] == first["worker_fds"], "an unloaded package's archive is still open"
    assert last["segments"] == first["segments"], "shared-memory segments left in /dev/shm"


def readings(daemon_pid: int, workers: list[int]) -> dict[str, Any]:
    rss = {"daemon": rss_bytes(daemon_pid)}
    rss.update({f"worker {pid}": rss_bytes(pid) for pid in workers})
    return {
        "rss": rss,
        "deleted_segments_mapped": sum(deleted_segments_mapped(pid) for pid in workers),
        "daemon_fds": len(os.listdir(f"/proc/{daemon_pid}/fd")),
        "worker_fds": sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in workers),
        "segments": sorted(name for name in os.listdir("/dev/shm") if name.startswith(f"deployd-{daemon_pid}-")),
    }


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def deleted_segments_mapped(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as maps:
        return sum(1 for line in maps if "/deployd-" in line and line.rstrip().endswith("(deleted)"))
