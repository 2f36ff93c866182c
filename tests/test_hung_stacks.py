"""Where a hung call hung: before the daemon kills a worker stuck in a call (past
pool.max_call_seconds, or past its caller giving up by pool.abandoned_call_grace_seconds),
the worker's Python stacks are written to the daemon's log, under a line that names the
worker, its pid and the call. Through the daemon and on a worker's own data port.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from client import DeadlineExceededError, InterpreterManager, Retry, UnavailableError
from deployd_wire.proto import deployd_pb2 as pb
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, wait_until
from tests.test_data_ports import endpoints, invoke, rpc_error

NAP = "a_distinctively_named_nap"

_MODEL = f"""
import time


def {NAP}(seconds):
    time.sleep(seconds)


class Sleeper:
    def sleep(self, seconds):
        {NAP}(seconds)
        return seconds
"""

_BUILD = """
import sys
from torch.package import PackageExporter

sys.path.insert(0, sys.argv[1])
import hung_stacks_model

with PackageExporter(sys.argv[2]) as exporter:
    exporter.intern("hung_stacks_model")
    exporter.save_pickle("sleepers", "sleeper.pkl", hung_stacks_model.Sleeper())
"""


@pytest.fixture(scope="module")
def sleeper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package directory holding sleeper.pt: a model whose method sleeps inside NAP."""
    source = tmp_path_factory.mktemp("sleeper_source")
    (source / "hung_stacks_model.py").write_text(textwrap.dedent(_MODEL))
    directory = tmp_path_factory.mktemp("sleeper_packages")
    subprocess.run([sys.executable, "-c", _BUILD, str(source), str(directory / "sleeper.pt")], check=True, timeout=180)
    return directory


@pytest.fixture
def daemon_with(sleeper_dir: Path, tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(**sections: Any) -> DaemonProcess:
        config = write_config(tmp_path / f"config-{len(started)}.yaml", sleeper_dir, **sections)
        started.append(DaemonProcess(config).start())
        return started[-1]

    yield start
    for process in started:
        process.assert_clean_stop()


def stuck_line(log: str, call: str) -> re.Match[str] | None:
    """The daemon's line before a stack dump: the worker's slot and pid, and the call (on a data
    port, the id our client gave the call may follow)."""
    return re.search(rf"worker (\d+) \(pid (\d+)\) is stuck in {re.escape(call)}(?: \(call \d+\))?: ([^\n]*)", log)


def dumped(log: str) -> bool:
    """The model's frame: the sleeping function, in the package's module. (The daemon's line
    goes out on its log thread, the stacks straight from the worker: either may come first.)"""
    return re.search(rf'File "<torch_package_\d+>\.hung_stacks_model\.py", line \d+ in {NAP}', log) is not None


ON_A_PORT = {-1: "", 0: " on its data port"}  # how the stuck line ends, by pool.data_ports


@pytest.mark.parametrize("data_ports", [-1, 0], ids=["daemon-path", "direct"])
def test_a_call_over_max_call_seconds_leaves_its_stack_in_the_log(
    daemon_with: Callable[..., DaemonProcess], sleeper_dir: Path, data_ports: int
) -> None:
    daemon = daemon_with(pool={"max_call_seconds": 1.0, "data_ports": data_ports})
    with InterpreterManager(daemon.target, timeout=60, retry=Retry(attempts=1)) as manager:
        sleeper = manager.load_package(sleeper_dir / "sleeper.pt").load_pickle(
            "sleepers", "sleeper.pkl", name="sleeper"
        )
        pids = {worker.pid for worker in manager.status().workers}
        with pytest.raises(UnavailableError, match=r"ran over pool\.max_call_seconds \(1s\)"):
            sleeper.call_method("sleep", 30.0)
    # The call, its object and its model (a data port's worker marks them on the call board).
    call = f"Invoke {sleeper.object_id}.sleep (model sleeper v1){ON_A_PORT[data_ports]}"
    assert wait_until(lambda: stuck_line(daemon.log, call) is not None and dumped(daemon.log), 10), daemon.log
    line = stuck_line(daemon.log, call)
    assert line is not None
    assert int(line.group(2)) in pids
    assert "ran past pool.max_call_seconds (1s)" in line.group(3)
    if data_ports < 0:  # The call's own line names the model (a port's worker died with its call).
        assert wait_until(lambda: "method=Invoke object=sleeper status=UNAVAILABLE" in daemon.log, 10), daemon.log


@pytest.mark.parametrize("data_ports", [-1, 0], ids=["daemon-path", "direct"])
def test_a_call_its_caller_gave_up_on_leaves_its_stack_in_the_log(
    daemon_with: Callable[..., DaemonProcess], sleeper_dir: Path, data_ports: int
) -> None:
    daemon = daemon_with(pool={"abandoned_call_grace_seconds": 1.0, "data_ports": data_ports})
    with InterpreterManager(daemon.target, timeout=60, retry=Retry(attempts=1)) as manager:
        sleeper = manager.load_package(sleeper_dir / "sleeper.pt").load_pickle("sleepers", "sleeper.pkl")
        with pytest.raises(DeadlineExceededError):
            sleeper.options(timeout=1.0).call_method("sleep", 30.0)
    call = f"Invoke {sleeper.object_id}.sleep{ON_A_PORT[data_ports]}"
    assert wait_until(lambda: stuck_line(daemon.log, call) is not None and dumped(daemon.log), 15), daemon.log
    line = stuck_line(daemon.log, call)
    assert line is not None
    # The daemon hears of a caller giving up; a port's worker sees only the deadline pass.
    why = "its caller gave up 1s ago" if data_ports < 0 else "its caller's deadline passed"
    assert why in line.group(3)


def test_a_hung_call_on_a_data_port_leaves_its_stack_in_the_log(
    daemon_with: Callable[..., DaemonProcess], sleeper_dir: Path
) -> None:
    daemon = daemon_with(pool={"max_call_seconds": 1.0, "data_ports": 0})
    with InterpreterManager(daemon.target, timeout=60) as manager:
        package = manager.load_package(sleeper_dir / "sleeper.pt")
        sleeper = package.load_pickle("sleepers", "sleeper.pkl", name="sleeper")
    worker = endpoints(daemon.target).workers[0]
    error = rpc_error(
        lambda: invoke(
            worker.address,
            "sleeper",
            pb.Value(double_value=30),
            method="sleep",
            metadata=(("deployd-call-id", "4242"),),
        )
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    call = f"Invoke {sleeper.object_id}.sleep (model sleeper v1) on its data port (call 4242)"
    assert wait_until(lambda: stuck_line(daemon.log, call) is not None and dumped(daemon.log), 10), daemon.log
    line = stuck_line(daemon.log, call)
    assert line is not None
    assert (int(line.group(1)), int(line.group(2))) == (worker.slot, worker.pid)
    assert "ran past pool.max_call_seconds (1s)" in line.group(3)
