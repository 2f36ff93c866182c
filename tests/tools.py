"""External programs the deployment tests need (promtool, prometheus, docker-compose).

`make test` installs them (the Makefile's deploy-tools target), so in CI ($CI set) a missing
one fails the test; elsewhere the test is skipped with the command that installs it.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def require_program(name: str) -> str:
    """The program's path; skips the test when it is missing outside CI, fails it in CI."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (`make deploy-tools` installs it from Debian)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; in CI `make test` must have installed it")
        pytest.skip(reason)
    return path


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (for programs that cannot bind port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
