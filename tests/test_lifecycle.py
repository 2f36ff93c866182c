"""Worker death, replacement and replay; health; reflection; a clean stop."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client import InterpreterManager, UnavailableError
from tests.daemon_process import DaemonProcess, alive, wait_until


def worker_pids(manager: InterpreterManager) -> set[int]:
    return {worker.pid for worker in manager.status().workers if worker.state not in ("stopped", "restarting")}


def wait_for_replacement(manager: InterpreterManager, old_pids: set[int], timeout: float = 30.0) -> set[int]:
    """Wait until every slot has a serving worker and the pids are no longer old_pids."""

    def replaced() -> bool:
        status = manager.status().workers
        return all(w.state in ("idle", "busy") for w in status) and {w.pid for w in status} != old_pids

    assert wait_until(replaced, timeout), f"pool not restored: {manager.status()}"
    return worker_pids(manager)


def test_worker_that_dies_during_a_call(fresh_daemon: DaemonProcess, package_dir: Path) -> None:
    with InterpreterManager(fresh_daemon.target, timeout=60) as manager:
        manager.register_module_source("deployd_test_late", "VALUE = 42\n")
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
        before = worker_pids(manager)
        with pytest.raises(UnavailableError, match="exited with code 3") as raised:
            scale.call_method("exit_now", 3)
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        after = wait_for_replacement(manager, before)
        assert len(after) == 2 and after != before
        # The replacement got the object and the registered module replayed into it.
        for _ in range(6):
            assert torch.equal(scale(torch.ones(1)), torch.full((1,), 2.0))
            assert scale.call_method("call_module", "deployd_test_late", "__getattribute__", "VALUE") == 42
        assert {w.restarts for w in manager.status().workers} == {0, 1}


def test_worker_killed_from_outside_is_replaced(fresh_daemon: DaemonProcess, package_dir: Path) -> None:
    with InterpreterManager(fresh_daemon.target, timeout=60) as manager:
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
        before = worker_pids(manager)
        victim = scale.call_method("pid")
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: not alive(victim), 10)
        pids = wait_for_replacement(manager, before)
        assert victim not in pids
        assert {scale.call_method("pid") for _ in range(8)} <= pids
        assert "was killed by signal SIGKILL" in fresh_daemon.log
        # The replacement's replica maps the same shared weights as the survivor's.
        weight_files = {scale.call_method("weight_file") for _ in range(6)}
        assert len(weight_files) == 1 and next(iter(weight_files)).startswith("/dev/shm/deployd-")


def test_health_and_reflection(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "deployd.v1.Deployd"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=10)))
        names = {service.name for service in response.list_services_response.service}
        assert {"deployd.v1.Deployd", "grpc.health.v1.Health"} <= names


def test_sigterm_stops_workers_and_leaves_nothing(package_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import write_config

    process = DaemonProcess(write_config(tmp_path / "config.yaml", package_dir)).start()
    try:
        with InterpreterManager(process.target, timeout=60) as manager:
            manager.load_package(package_dir / "conv.pt").load_pickle("model", "model.pkl")
            workers = worker_pids(manager)
        assert len(workers) == 2
    finally:
        process.assert_clean_stop()
    assert not any(alive(pid) for pid in workers)
    assert "stopped" in process.log


def test_taken_port_fails_fast_with_a_message(package_dir: Path, tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from tests.conftest import write_config
    from tests.daemon_process import REPO

    config = write_config(tmp_path / "config.yaml", package_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "server", "serve", "--config", str(config), "--address", f"127.0.0.1:{port}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert f"cannot bind 127.0.0.1:{port}" in result.stderr


def test_start_removes_segments_of_a_daemon_that_died(package_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import write_config

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    stale = Path(f"/dev/shm/deployd-{dead_pid}-0")
    stale.write_bytes(b"left behind by a daemon that was SIGKILLed")
    try:
        process = DaemonProcess(write_config(tmp_path / "config.yaml", package_dir)).start()
        try:
            assert not stale.exists()
            assert "removed 1 shared-memory segments" in process.log
        finally:
            process.assert_clean_stop()
    finally:
        stale.unlink(missing_ok=True)


def test_a_worker_whose_caller_gave_up_takes_no_call_until_it_answers(
    fresh_daemon: DaemonProcess, package_dir: Path
) -> None:
    import time

    from client import DeadlineExceededError

    with InterpreterManager(fresh_daemon.target, timeout=60) as manager:
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
        with pytest.raises(DeadlineExceededError):
            scale.options(timeout=0.3).call_method("nap", 2.0)
        started = time.monotonic()
        answered_by = {scale.call_method("pid") for _ in range(4)}
        assert time.monotonic() - started < 1.5, "calls waited behind the abandoned one"
        assert len(answered_by) == 1, "only the free worker took calls"
        # Once the abandoned call finishes, its worker serves again.
        assert wait_until(lambda: len({scale.call_method("pid") for _ in range(4)}) == 2, 10)


def test_workers_start_with_tuned_malloc(daemon: DaemonProcess) -> None:
    with InterpreterManager(daemon.target, timeout=60) as manager:
        pids = worker_pids(manager)
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            variables = environ.read().split(b"\0")
        assert b"MALLOC_MMAP_THRESHOLD_=33554432" in variables
        assert b"MALLOC_TRIM_THRESHOLD_=1073741824" in variables
