"""Sessions leave nothing behind: open a session, make objects, call them, close it, over and over.

Each cycle is bench.session_churn's: a torch.nn.Linear(256, 256) made in a session, called on
a 128 KiB tensor (through shared memory both ways), the result brought back; every 10th cycle
a create_movable of the layer, called and unloaded; every 50th a session left open by a
client that goes away. A session that kept its objects would keep ~0.5 MiB a cycle in a
worker (the layer's 256 KiB of weights, the input and the output): ~65 MiB over these
cycles. `python -m bench.session_churn` runs thousands of cycles and prints the figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench.session_churn import ROWS, WIDTH, Reading, one_cycle, read
from client import InterpreterManager
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, wait_until

CYCLES = 150
WARM_UP = 20  # the first cycles build what lasts (shared-memory arenas, caches): measure from here
MIB = 2**20
# The workers' anonymous memory together may grow this much after the warm-up (it grows ~1 MiB).
WORKER_GROWTH_BOUND = 16 * MIB


@pytest.fixture
def churn_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    config = write_config(tmp_path / "config.yaml", tmp_path, server={"log_calls": False})
    process = DaemonProcess(config).start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


def test_sessions_leave_nothing_behind(churn_daemon: DaemonProcess) -> None:
    x = torch.randn(ROWS, WIDTH)
    daemon_pid = churn_daemon.pid
    with InterpreterManager(churn_daemon.target, timeout=60) as manager:
        first: Reading | None = None
        for cycle in range(CYCLES):
            one_cycle(manager, cycle, x)
            if cycle == WARM_UP - 1:
                first = read(manager, daemon_pid, cycle, 0.0)
        assert first is not None
        # The last cycle's client went away: its connection's fd closes a moment after its session ends.
        wait_until(lambda: read(manager, daemon_pid, CYCLES - 1, 0.0).daemon_fds <= first.daemon_fds, 10)
        last = read(manager, daemon_pid, CYCLES - 1, 0.0)
        open_sessions = [entry.session_id for entry in manager.status().sessions]

    problems = []
    if last.worker_pids != first.worker_pids:
        problems.append(f"a worker was replaced: {first.worker_pids} -> {last.worker_pids}")
    # Anonymous memory: what a leak of objects or tensors grows. Total RSS also counts the pages
    # of torch's libraries a worker touches for the first time late (a session pins one worker,
    # so the two warm up unevenly: seen once in CI, one worker 220.9 -> 237.8 MiB, anon flat);
    # shared-memory leaks are checked below (fds, segments, deleted mappings).
    grown = sum(last.worker_anon) - sum(first.worker_anon)
    if grown >= WORKER_GROWTH_BOUND:
        problems.append(
            f"the workers' anonymous memory grew by {grown / MIB:.1f} MiB over {CYCLES - WARM_UP} cycles"
            f" ({grown / 1024 / (CYCLES - WARM_UP):.0f} KiB a cycle):"
            f" {[f'{rss / MIB:.1f}' for rss in first.worker_rss]} -> {[f'{rss / MIB:.1f}' for rss in last.worker_rss]}"
            f" MiB; anonymous {[f'{anon / MIB:.1f}' for anon in first.worker_anon]}"
            f" -> {[f'{anon / MIB:.1f}' for anon in last.worker_anon]} MiB"
        )
    # A worker keeps a descriptor per shared segment it maps (an mmap holds a dup of its fd): up to
    # four tensor arenas (server.worker.shared.ArenaMappings), which one worker may still be adding
    # after the warm-up. A leak shows as one per cycle or per movable (13 of them here), not 1-2.
    if any(after - before > 2 for before, after in zip(first.worker_fds, last.worker_fds, strict=True)):
        problems.append(f"worker fds {first.worker_fds} -> {last.worker_fds}")
    if last.daemon_fds != first.daemon_fds:
        problems.append(f"daemon fds {first.daemon_fds} -> {last.daemon_fds}")
    if last.segments != first.segments:
        problems.append(f"deployd segments in /dev/shm {first.segments} -> {last.segments}")
    if last.deleted_maps:
        problems.append(f"{last.deleted_maps} unlinked deployd segments still mapped in the workers")
    if open_sessions:
        problems.append(f"{len(open_sessions)} sessions still open: {open_sessions[:5]}")
    assert not problems, "\n".join(problems)
