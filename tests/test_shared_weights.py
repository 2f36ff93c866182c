"""Weights held once: every replica maps the same shared pages; writes stay in one replica."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from client import InterpreterManager
from tests.daemon_process import DaemonProcess, wait_until


def test_every_replica_maps_the_packages_shared_segment(manager: InterpreterManager, package_dir: Path) -> None:
    scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
    files = {scale.call_method("weight_file") for _ in range(6)}
    assert len(files) == 1, files
    (name,) = files
    assert name.startswith("/dev/shm/deployd-"), name
    assert os.path.exists(name)


def test_in_place_writes_stay_in_one_replica(manager: InterpreterManager, package_dir: Path) -> None:
    package = manager.load_package(package_dir / "models.pt")
    scale = package.load_pickle("models", "scale.pkl")
    mutated_pid = scale.call_method("multiply_factor_in_place", 10.0)
    seen = dict(scale.call_method("factor_here") for _ in range(8))
    assert seen[mutated_pid] == 20.0
    assert set(seen.values()) == {20.0, 2.0}, "the other worker keeps the original weights"
    # A new object from the same package starts from the packaged weights everywhere.
    fresh = package.load_pickle("models", "scale.pkl")
    assert {value for _, value in (fresh.call_method("factor_here") for _ in range(8))} == {2.0}


def test_status_reports_shared_and_private_memory(manager: InterpreterManager, package_dir: Path) -> None:
    manager.load_package(package_dir / "big.pt").load_pickle("big", "model.pkl")(torch.ones(1, 1200))
    for worker in manager.status().workers:
        assert worker.rss_bytes > 0 and worker.pss_bytes > 0
        assert worker.shared_bytes > 0 and worker.private_bytes > 0
        assert worker.rss_bytes >= worker.pss_bytes


def test_unloading_the_package_removes_its_segment(fresh_daemon: DaemonProcess, package_dir: Path) -> None:
    def daemons_segments() -> set[str]:
        return {name for name in os.listdir("/dev/shm") if name.startswith(f"deployd-{fresh_daemon.pid}-")}

    with InterpreterManager(fresh_daemon.target, timeout=60) as manager:
        before = daemons_segments()  # the daemon's own for its life (the cancel board), arenas
        package = manager.load_package(package_dir / "big.pt")
        linear = package.load_pickle("big", "model.pkl")
        assert linear(torch.ones(1, 1200)).shape == (1, 1200)
        segments = daemons_segments() - before
        assert segments, "the package's weights are in a segment of their own"
        package.unload()
        assert wait_until(lambda: not any(os.path.exists(f"/dev/shm/{name}") for name in segments), 10)
