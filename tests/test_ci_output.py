"""A failing run says which test failed and why, whole, in its last lines (pyproject's addopts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.daemon_process import REPO

WHY = "the worker's exit code was read as 255 while another worker started" + ", and so on" * 10


def test_a_failing_run_ends_with_each_failure_and_its_whole_reason(tmp_path: Path) -> None:
    planted = tmp_path / "test_planted.py"
    planted.write_text(
        "import pytest\n\n"
        "def test_passes():\n    pass\n\n"
        f"def test_fails():\n    assert 255 == -9, {WHY!r}\n\n"
        "@pytest.fixture\ndef leaky():\n    yield\n    raise AssertionError('a child process was left behind')\n\n"
        "def test_leaks(leaky):\n    pass\n"
    )
    config = ["-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), "-p", "no:cacheprovider"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *config, str(planted)],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "80"},  # no CI variable: pytest would not cut lines there
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    tail = result.stdout.splitlines()[-8:]
    assert f"FAILED test_planted.py::test_fails - AssertionError: {WHY}" in tail, "\n".join(tail)
    assert "ERROR test_planted.py::test_leaks - AssertionError: a child process was left behind" in tail, tail
    assert tail[-1].startswith("=") and "1 failed" in tail[-1], tail
