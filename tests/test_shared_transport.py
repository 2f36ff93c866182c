"""Tensors between the daemon and its workers: large ones through shared memory, small inline.
Every call here takes the daemon's path (direct=False): on a data port, tensors come in the
gRPC message to the worker itself."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from client import InterpreterManager, ReplicatedObj
from tests.daemon_process import DaemonProcess

THRESHOLD = 65536  # worker.shm_threshold_bytes, the default


@pytest.fixture
def scale(daemon: DaemonProcess, package_dir: Path) -> Iterator[ReplicatedObj]:
    with InterpreterManager(daemon.target, timeout=60, direct=False) as manager:
        yield manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")


def test_large_inputs_are_wrapped_in_shared_memory(scale: ReplicatedObj, daemon: DaemonProcess) -> None:
    large = torch.ones(THRESHOLD // 4)
    for _ in range(4):
        where = scale.call_method("input_file", large)
        assert where.startswith(f"/dev/shm/deployd-{daemon.pid}-"), where


def test_small_inputs_travel_inline(scale: ReplicatedObj) -> None:
    where = scale.call_method("input_file", torch.ones(16))
    assert not where.startswith("/dev/shm"), where


def test_large_results_come_back_whole(scale: ReplicatedObj) -> None:
    for size in (THRESHOLD // 4, 3 << 20, 1 << 20, 5 << 20):  # grows the reply arena, then reuses it
        x = torch.arange(size, dtype=torch.float32)
        assert torch.equal(scale(x), x * 2)


def test_model_that_keeps_its_input_keeps_its_values(fresh_daemon: DaemonProcess, package_dir: Path) -> None:
    with InterpreterManager(fresh_daemon.target, timeout=60, direct=False) as manager:
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
        keeper = scale.call_method("keep", torch.full((THRESHOLD,), 1.0))
        # Later calls, on every worker, must not write over the input that was kept.
        for _ in range(6):
            assert torch.equal(scale(torch.full((THRESHOLD,), 5.0)), torch.full((THRESHOLD,), 10.0))
        sums = dict(scale.call_method("kept_sum") for _ in range(6))
        assert sums[keeper] == float(THRESHOLD)


def test_arenas_are_named_for_the_daemon(fresh_daemon: DaemonProcess, package_dir: Path) -> None:
    with InterpreterManager(fresh_daemon.target, timeout=60, direct=False) as manager:
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
        scale(torch.ones(THRESHOLD))
        worker_pids = {str(worker.pid) for worker in manager.status().workers}
    segments = [name.split("-") for name in os.listdir("/dev/shm") if name.startswith("deployd-")]
    assert any(pid == str(fresh_daemon.pid) for _, pid, _ in segments)
    assert not any(pid in worker_pids for _, pid, _ in segments), "workers never create segments"
