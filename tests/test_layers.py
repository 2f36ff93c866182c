"""The layers keep to their imports: the daemon never loads torch, the pool and workers never grpc."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.daemon_process import REPO


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("server.daemon", "torch"),  # hundreds of MB the daemon has no use for
        ("server.pool", "grpc"),
        ("server.service", "grpc"),
        ("server.worker.main", "grpc"),
        ("server.worker.preload", "grpc"),  # the fork server must never have run grpc
    ],
)
def test_module_does_not_import(module: str, forbidden: str) -> None:
    code = f"import sys, {module}; sys.exit(int({forbidden!r} in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{module} imports {forbidden}{result.stderr}"
