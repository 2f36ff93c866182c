"""The Node.js example (examples/node) against the real daemon: the Python client's numbers and
errors, and, with data ports, its calls straight to the workers (round_robin over ipv4:...)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from client import InterpreterManager, RemoteError
from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc
from tests.conftest import write_config
from tests.daemon_process import REPO, DaemonProcess

NODE_DIR = REPO / "examples" / "node"
SCRIPT = NODE_DIR / "index.js"
NPM_CI_SECONDS = 240
NODE_SECONDS = 90
TOKEN = "node-admin-5c1e"

pytestmark = pytest.mark.timeout(NPM_CI_SECONDS + 2 * NODE_SECONDS + 60)


def _unavailable(reason: str) -> None:
    """Skip, except on CI, whose machines have node: there a missing tool must not pass unnoticed."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI is set: CI machines must run the Node.js example")
    pytest.skip(reason)


def _installed_matches_lockfile() -> bool:
    """npm's own record of node_modules (.package-lock.json) lists every locked package, same bytes."""
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    if not installed.exists():
        return False
    wanted = json.loads((NODE_DIR / "package-lock.json").read_text())["packages"]
    have = json.loads(installed.read_text())["packages"]
    return all(
        have.get(path, {}).get("integrity") == entry.get("integrity") and (NODE_DIR / path).is_dir()
        for path, entry in wanted.items()
        if path
    )


@pytest.fixture(scope="session")
def node() -> str:
    """node, with the example's dependencies installed from its lockfile (once per checkout)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable(f"{'node' if node is None else 'npm'} is not installed: the Node.js example cannot run")
    assert node is not None and npm is not None
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    if int(version.strip().lstrip("v").split(".")[0]) < 20:
        _unavailable(f"node {version.strip()} is older than the example's node >= 20")
    # Two test runs in one checkout must not run npm ci over each other.
    with open(NODE_DIR / "package-lock.json", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed_matches_lockfile():
            result = subprocess.run(
                [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=NPM_CI_SECONDS,
            )
            assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
            assert _installed_matches_lockfile(), "npm ci left node_modules unlike package-lock.json"
    return node


def run_example(
    node: str, *args: str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if key not in ("DEPLOYD_ADDRESS", "DEPLOYD_TOKEN")}
    return subprocess.run(
        [node, str(SCRIPT), *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=NODE_SECONDS,
    )


def printed(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The example's JSON lines, by their one key ("result", "error")."""
    assert result.returncode == 0, f"the example failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert all(len(line) == 1 for line in lines), result.stdout
    return {key: value for line in lines for key, value in line.items()}


def loaded(manager: InterpreterManager) -> tuple[set[str], set[str]]:
    status = manager.status()
    return {entry.package_id for entry in status.packages}, {entry.object_id for entry in status.objects}


@pytest.fixture
def python_answers(manager: InterpreterManager, package_dir: Path) -> Iterator[tuple[torch.Tensor, RemoteError]]:
    """The Python client's answers to the example's two calls, leaving the daemon as it was."""
    packages_before, _ = loaded(manager)
    package = manager.load_package(package_dir / "conv.pt")
    model = package.load_pickle("model", "model.pkl")
    try:
        output = model(torch.ones(1, 1, 10, 10))
        with pytest.raises(RemoteError) as failure:
            model(torch.zeros(1, 2, 10, 10))
        yield output, failure.value
    finally:
        model.unload()
        if package.id not in packages_before:
            package.unload()


def test_node_example_gets_the_python_clients_answer_and_error(
    node: str,
    daemon: DaemonProcess,
    manager: InterpreterManager,
    package_dir: Path,
    python_answers: tuple[torch.Tensor, RemoteError],
) -> None:
    before = loaded(manager)
    output = printed(run_example(node, daemon.target, str(package_dir / "conv.pt")))
    assert loaded(manager) == before, "the example should unload what it loaded"

    expected, python_error = python_answers
    result = output["result"]
    assert result["dtype"] == "DTYPE_FLOAT32"
    assert result["shape"] == [1, 64, 2, 2] == list(expected.shape)
    values = torch.tensor(result["values"], dtype=torch.float32).reshape(result["shape"])
    assert torch.allclose(values, expected, rtol=0, atol=1e-6), (values - expected).abs().max()
    assert values.abs().sum() > 0, "an all-zero answer would hide a decoding error"

    error = output["error"]
    assert (error["code"], error["code_name"]) == (python_error.code.value[0], python_error.code.name) == (2, "UNKNOWN")
    # Each call has its own id, which the message names: the daemon logs the whole traceback under it.
    assert error["details"].replace(error["call_id"], "ID") == python_error.details.replace(python_error.call_id, "ID")
    assert error["call_id"] and f"call id {error['call_id']}: the whole traceback" in error["details"]
    assert "expected input[1, 2, 10, 10] to have 1 channels" in error["details"]
    assert error["remote_type"] == python_error.remote_type == "RuntimeError"
    assert "Traceback" in error["remote_traceback"]
    assert error["call_killed_worker"] is False


def test_node_example_defaults_and_token(node: str, package_dir: Path, tmp_path: Path) -> None:
    """$DEPLOYD_ADDRESS, the README's my_package.pt in the working directory, and $DEPLOYD_TOKEN."""
    config = write_config(tmp_path / "config.yaml", package_dir, auth={"admin_tokens": [TOKEN]})
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(package_dir / "conv.pt", work / "my_package.pt")
    daemon = DaemonProcess(config).start()
    try:
        refused = run_example(node, cwd=work, env={"DEPLOYD_ADDRESS": daemon.target})
        assert refused.returncode == 1, refused.stdout
        assert "UNAUTHENTICATED" in refused.stderr
        output = printed(run_example(node, cwd=work, env={"DEPLOYD_ADDRESS": daemon.target, "DEPLOYD_TOKEN": TOKEN}))
        assert output["result"]["shape"] == [1, 64, 2, 2]
        assert output["error"]["remote_type"] == "RuntimeError"
        with InterpreterManager(daemon.target, token=TOKEN, timeout=60) as manager:
            assert loaded(manager) == (set(), set()), "the example should unload what it loaded"
    finally:
        daemon.assert_clean_stop()


def test_node_example_calls_the_workers_directly(node: str, package_dir: Path, tmp_path: Path) -> None:
    """With pool.data_ports, the example asks Endpoints and sends its calls over one channel to
    ipv4:HOST:P1,HOST:P2 with round_robin: every call is answered by a worker's own port (grpc-js's
    getPeer()), both workers take some, none goes through the daemon, and the answers are the
    daemon path's, byte for byte."""
    config = write_config(tmp_path / "config.yaml", package_dir, pool={"data_ports": 0})
    daemon = DaemonProcess(config).start()
    try:
        output = printed(run_example(node, daemon.target, str(package_dir / "conv.pt")))
        with grpc.insecure_channel(daemon.target) as channel:
            workers = pb_grpc.DeploydStub(channel).Endpoints(pb.EndpointsRequest(), timeout=30).workers
        addresses = [worker.address for worker in workers]
        assert len(addresses) == 2 and all(address.startswith("127.0.0.1:") for address in addresses), addresses
        direct = output["direct"]
        assert direct["target"] == "ipv4:" + ",".join(addresses)
        assert set(direct["peers"]) == set(addresses), f"round_robin over both workers: {direct['peers']}"
        assert sum(direct["peers"].values()) == direct["calls"] == 10
        assert direct["same_as_daemon"] is True
        assert output["result"]["shape"] == [1, 64, 2, 2]  # the daemon path, as before
        assert output["error"]["remote_type"] == "RuntimeError"
        with InterpreterManager(daemon.target, timeout=60) as manager:
            assert loaded(manager) == (set(), set()), "the example should unload what it loaded"
    finally:
        daemon.assert_clean_stop()
