"""The seed example of torch::deploy, end to end, and many callers at once."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import torch
from torch.package import PackageImporter

from client import InterpreterManager
from tests.daemon_process import REPO, DaemonProcess


def run_locally(package: Path, module: str, file: str, *args: torch.Tensor) -> torch.Tensor:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker, so the float results match bit for bit
    try:
        with torch.no_grad():
            return PackageImporter(str(package)).load_pickle(module, file)(*args)  # type: ignore[no-any-return]
    finally:
        torch.set_num_threads(previous)


def test_seed_example_matches_local_execution_bit_for_bit(manager: InterpreterManager, package_dir: Path) -> None:
    package = manager.load_package(package_dir / "conv.pt")
    model = package.load_pickle("model", "model.pkl")
    inputs = torch.ones(1, 1, 10, 10)
    expected = run_locally(package_dir / "conv.pt", "model", "model.pkl", inputs)
    output = model(inputs)
    assert output.shape == (1, 64, 2, 2)
    assert output.dtype == torch.float32
    assert torch.equal(output, expected)
    assert torch.equal(output[:, :5], expected[:, :5])


def test_eight_threads_each_get_their_own_answer_spread_over_workers(
    manager: InterpreterManager, package_dir: Path
) -> None:
    model = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
    failures: list[str] = []
    pids: set[int] = set()
    lock = threading.Lock()

    def caller(thread: int) -> None:
        for call in range(50):
            x = torch.full((3,), float(thread * 1000 + call))
            pid, doubled = model.call_method("tagged_double", x)
            with lock:
                pids.add(pid)
                if not torch.equal(doubled, x * 2):
                    failures.append(f"thread {thread} call {call}: {doubled} != {x * 2}")

    threads = [threading.Thread(target=caller, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures
    worker_pids = {worker.pid for worker in manager.status().workers}
    assert pids == worker_pids, "calls should reach every worker"


def test_num_workers_and_status(manager: InterpreterManager, package_dir: Path) -> None:
    package = manager.load_package(package_dir / "conv.pt")
    model = package.load_pickle("model", "model.pkl")
    assert manager.num_workers == 2
    status = manager.status()
    assert {worker.state for worker in status.workers} <= {"idle", "busy"}
    assert package.id in {entry.package_id for entry in status.packages}
    assert model.id in {entry.object_id for entry in status.objects}


def test_make_serve_serves_the_seed_model_by_name(tmp_path: Path) -> None:
    """What `make serve` does (export the seed, serve the bundled config.yaml), then the README's
    by-name example, its KServe v2, asyncio and sessions examples as written."""
    packages = tmp_path / "packages"
    subprocess.run([sys.executable, str(REPO / "scripts" / "export_seed.py"), str(packages / "seed.pt")], check=True)
    daemon = DaemonProcess(REPO / "config.yaml", env={"DEPLOYD_PACKAGES_DIRECTORY": str(packages)})
    daemon.start()
    try:
        quick_start = (REPO / "README.md").read_text().split("## Quick start", 1)[1]
        by_name = re.findall(r"```python\n(.*?)```", quick_start, re.S)[1]
        assert 'manager.model("seed")' in by_name
        script = by_name.replace('"127.0.0.1:50051"', repr(daemon.target))
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "tensor(" in result.stdout
        # The README's KServe v2 example, through tritonclient, on the same daemon.
        any_language = (REPO / "README.md").read_text().split("## Any language", 1)[1]
        v2_example = re.findall(r"```python\n(.*?)```", any_language, re.S)[0]
        assert "tritonclient" in v2_example
        script = v2_example.replace('"127.0.0.1:50051"', repr(daemon.target))
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "(1, 64, 2, 2)" in result.stdout and "pytorch_torch_package" in result.stdout
        # The README's asyncio example, on the same daemon.
        from_asyncio = (REPO / "README.md").read_text().split("## From asyncio", 1)[1]
        aio_example = re.findall(r"```python\n(.*?)```", from_asyncio, re.S)[0]
        assert "AsyncInterpreterManager" in aio_example
        script = aio_example.replace('"127.0.0.1:50051"', repr(daemon.target))
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str([(1, 64, 2, 2)] * 8)
        # The README's sessions example, on the same daemon.
        sessions = (REPO / "README.md").read_text().split("## Sessions and Objs", 1)[1]
        sessions_example = re.findall(r"```python\n(.*?)```", sessions, re.S)[0]
        assert "create_movable" in sessions_example
        script = sessions_example.replace('"127.0.0.1:50051"', repr(daemon.target))
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["tensor([[2.,", "2.]])"] * 2
    finally:
        daemon.assert_clean_stop()
