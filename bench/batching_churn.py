"""Batching churn: load a model with batching by name, 8 concurrent calls of 128 KiB tensors
(batched into the shared-memory inbox), unload it; CYCLES times against one daemon (2 workers).
Prints the daemon's and workers' RSS and fds and /dev/shm's segments every 100 cycles: they
must stay flat (each load makes a batcher, each unload closes it).

    python -m bench.batching_churn [CYCLES]      (default 1000)

In the suite (`python -m bench`, run()): 200 cycles; with --smoke, 5 (the code works, no trend).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

from bench.common import Context
from client import Batching, InterpreterManager
from server.pool.procinfo import descendants_of
from tests.daemon_process import REPO, DaemonProcess, shm_segments


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _call(model: object, x: torch.Tensor, answers: list[object], index: int) -> None:
    answers[index] = model(x)  # type: ignore[operator]


SUITE_CYCLES, SMOKE_CYCLES = 200, 5


def run(ctx: Context) -> None:
    cycles = SMOKE_CYCLES if ctx.smoke else SUITE_CYCLES
    started = time.monotonic()
    main(cycles)
    ctx.report.line(
        f"batching_churn: {cycles} cycles of load (batching) / 8 concurrent calls / unload in"
        f" {time.monotonic() - started:.1f} s (the daemon's start and stop included); it stopped clean"
    )


def main(cycles: int) -> None:
    with tempfile.TemporaryDirectory() as work:
        packages = Path(work)
        builder = REPO / "tests" / "package_builder.py"
        subprocess.run([sys.executable, str(builder), "models", str(packages / "models.pt")], check=True)
        config = packages / "config.yaml"
        settings = {
            "pool": {"workers": 2},
            "packages": {"directory": str(packages)},
            "server": {"log_calls": False, "shutdown_grace_seconds": 5.0},
        }
        config.write_text(yaml.safe_dump(settings))
        daemon = DaemonProcess(config).start()
        try:
            with InterpreterManager(daemon.target, timeout=60) as manager:
                package = manager.load_package(packages / "models.pt")
                inputs = [torch.full((1, 32768), float(i)) for i in range(8)]
                started = time.monotonic()
                for cycle in range(cycles):
                    model = package.load_pickle("models", "batch_probe.pkl", name="churned", batching=Batching(8, 1.0))
                    answers: list[object] = [None] * 8
                    threads = [
                        threading.Thread(target=_call, args=(model, inputs[index], answers, index))
                        for index in range(8)
                    ]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join(timeout=60)
                    assert all(torch.equal(answers[i][0], inputs[i] * 2) for i in range(8))  # type: ignore[index]
                    model.unload()
                    if cycle % 100 == 0 or cycle == cycles - 1:
                        workers = descendants_of(daemon.pid)
                        print(
                            f"cycle {cycle}: daemon RSS {_rss_mib(daemon.pid):.1f} MiB, fds {_fds(daemon.pid)};"
                            f" workers RSS {sum(_rss_mib(w) for w in workers):.1f} MiB, fds"
                            f" {sum(_fds(w) for w in workers)}; /dev/shm {len(shm_segments())} segments;"
                            f" {time.monotonic() - started:.0f} s",
                            flush=True,
                        )
        finally:
            daemon.assert_clean_stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
