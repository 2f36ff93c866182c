"""Fixtures: test packages built once per session, and the real daemon on port 0."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from client import InterpreterManager
from tests.daemon_process import DaemonProcess

HERE = Path(__file__).parent
PACKAGES = ["conv", "models", "twin_a", "twin_b", "uses_extra", "big", "churn"]


@pytest.fixture(scope="session")
def package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test package, built in parallel subprocesses; the daemon's package directory."""
    directory = tmp_path_factory.mktemp("packages")
    builds = [
        subprocess.Popen([sys.executable, str(HERE / "package_builder.py"), name, str(directory / f"{name}.pt")])
        for name in PACKAGES
    ]
    assert all(build.wait(180) == 0 for build in builds), "building a test package failed"
    (directory / "not_a_package.pt").write_bytes(b"these bytes are not a zip archive" * 10)
    return directory


def write_config(path: Path, package_dir: Path, **sections: dict[str, object]) -> Path:
    config: dict[str, dict[str, object]] = {
        "pool": {"workers": 2},
        "packages": {"directory": str(package_dir)},
        "worker": {"extra_sys_paths": [str(HERE / "package_sources" / "extras")]},
        "server": {"shutdown_grace_seconds": 5.0},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def daemon(package_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon with two workers, shared by the tests that do not stop or break it."""
    config = write_config(tmp_path_factory.mktemp("config") / "config.yaml", package_dir)
    process = DaemonProcess(config).start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


@pytest.fixture
def fresh_daemon(package_dir: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon of the test's own, for tests that kill workers or stop it."""
    process = DaemonProcess(write_config(tmp_path / "config.yaml", package_dir)).start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


@pytest.fixture
def manager(daemon: DaemonProcess) -> Iterator[InterpreterManager]:
    with InterpreterManager(daemon.target, timeout=60) as connection:
        yield connection
