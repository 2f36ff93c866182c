"""A model's warmup (`warmup:` in its config entry): run on every worker after the load and on a
replacement before it serves; the model is SERVING (and ready) only after it ran; a warmup that
fails, or a warmup badly written, stops the start (exit 2) naming the model.

The model is SlowStart (tests/package_sources/models/testmodels.py): its first call in a process
sleeps a second, and every call appends "pid scale" to $DEPLOYD_TEST_CALL_LOG, so the tests read
which worker ran which warmup, and how often.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

# The v2 messages as Triton's client has them: ours (deployd_wire.proto) define the same protobuf
# names, and one process's descriptor pool takes each once (other test modules import tritonclient).
from tritonclient.grpc import service_pb2 as grpc_predict_v2_pb2
from tritonclient.grpc import service_pb2_grpc as grpc_predict_v2_pb2_grpc

from client import InterpreterManager, NotFoundError
from server.models.warmup import Warmup, WarmupError, parse_warmup
from tests.daemon_process import REPO, DaemonProcess
from tests.test_lifecycle import wait_for_replacement, worker_pids
from tests.test_operations import check_health, sample, scrape
from tests.test_repository import SCALE, config_with, rewrite_models, serve

SLOW = {"name": "slow", "package": "models.pt", "pickle": "models:slow_start.pkl"}
# Each model's warmup calls with its own scale: the call log tells them apart (real calls: 2.0).
WARM_ARGS = {**SLOW, "warmup": {"inputs": ["ones:2"], "kwargs": {"scale": "3"}, "repeat": 2}}
WARM_FILE = {**SLOW, "name": "slow_file", "warmup": {"file": "warmup/slow_args.pt"}}
FILE_SCALE = 5.0
# How long a call may take to count as warm: the cold one sleeps 1 s.
WARM_CALL_SECONDS = 0.5


def calls_by_worker(log: Path, scale: float) -> Counter[int]:
    """How many calls with this scale each worker ran."""
    lines = log.read_text().split() if log.exists() else []
    pairs = zip(lines[0::2], lines[1::2], strict=True)
    return Counter(int(pid) for pid, seen in pairs if float(seen) == scale)


@pytest.fixture(scope="module")
def call_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("calls") / "calls.log"


@pytest.fixture(scope="module")
def warm_daemon(package_dir: Path, tmp_path_factory: pytest.TempPathFactory, call_log: Path) -> Iterator[DaemonProcess]:
    """Two workers, "slow" warmed with ARGs (twice) and "slow_file" with a torch.save file."""
    (package_dir / "warmup").mkdir(exist_ok=True)
    torch.save({"args": [torch.ones(3)], "kwargs": {"scale": FILE_SCALE}}, package_dir / "warmup" / "slow_args.pt")
    config = config_with(tmp_path_factory.mktemp("config") / "config.yaml", package_dir, [WARM_ARGS, WARM_FILE])
    process = DaemonProcess(
        config, "--metrics-address", "127.0.0.1:0", env={"DEPLOYD_TEST_CALL_LOG": str(call_log)}
    ).start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


def timed(call: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_the_warmup_runs_on_every_worker_before_the_first_call(warm_daemon: DaemonProcess, call_log: Path) -> None:
    with InterpreterManager(warm_daemon.target, timeout=60) as manager:
        pids = worker_pids(manager)
        assert len(pids) == 2
        assert calls_by_worker(call_log, 3.0) == {pid: 2 for pid in pids}  # repeat: 2, on each worker
        assert calls_by_worker(call_log, FILE_SCALE) == {pid: 1 for pid in pids}
        for name in ("slow", "slow_file"):
            for _ in range(4):  # calls land on either worker: each is warm
                result, seconds = timed(lambda name=name: manager.model(name)(torch.ones(2)))
                assert torch.equal(result, torch.full((2,), 2.0)) and seconds < WARM_CALL_SECONDS, seconds
    assert "slow warmed up on 2 workers" in warm_daemon.log
    assert "slow_file warmed up on 2 workers" in warm_daemon.log
    metrics = scrape(warm_daemon)  # each model's warmup in each worker, each at least its cold call
    assert sample(metrics, "deployd_warmup_duration_seconds_count") == 4
    assert sample(metrics, "deployd_warmup_duration_seconds_sum") >= 4.0


def test_a_replacement_worker_is_warmed_before_it_takes_calls(warm_daemon: DaemonProcess, call_log: Path) -> None:
    with InterpreterManager(warm_daemon.target, timeout=60) as manager:
        before = worker_pids(manager)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        (replacement,) = wait_for_replacement(manager, before) - before
        # It serves only after its replay, warmup included: the log holds its warmup calls already.
        assert calls_by_worker(call_log, 3.0)[replacement] == 2
        assert calls_by_worker(call_log, FILE_SCALE)[replacement] == 1
        for _ in range(6):
            assert manager.model("slow").call_method("is_warm") is True
    warmed = r"worker \d: object 'obj-\w+' \(model slow v1\) warmed up in 1\.\d+s"
    assert re.search(warmed, warm_daemon.log), warm_daemon.log
    assert sample(scrape(warm_daemon), "deployd_warmup_duration_seconds_count") == 6  # 4 at start, 2 here


def test_a_model_serves_and_is_ready_only_once_its_warmup_ran(warm_daemon: DaemonProcess, call_log: Path) -> None:
    """Loaded by Reload: while its warmup runs (a second on each worker) its health is not
    SERVING and KServe v2 says not ready; the first time either says so, every worker ran it."""
    late = {**SLOW, "name": "late", "warmup": {"inputs": ["ones:2"], "kwargs": {"scale": "7"}}}
    failing = {**SCALE, "name": "failing", "warmup": {"method": "fail", "inputs": ['"cold"'], "repeat": 3}}
    seen: list[tuple[bool, bool, int]] = []  # (serving, ready, workers that ran late's warmup)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append((late_serving(warm_daemon.target), late_ready(warm_daemon.target), ran()))
            time.sleep(0.05)

    with InterpreterManager(warm_daemon.target, timeout=60) as manager:
        pids = worker_pids(manager)

        def ran() -> int:
            return len(set(calls_by_worker(call_log, 7.0)) & pids)

        rewrite_models(warm_daemon.config_path, [WARM_ARGS, WARM_FILE, late, failing])
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            report = manager.reload()
        finally:
            done.set()
            watcher.join(10)
        assert list(report.loaded) == ["late"] and sorted(report.unchanged) == ["slow", "slow_file"]
        (failure,) = report.failed
        assert failure.name == "failing"
        assert "warmup call 1 of 3 (fail) raised ValueError: cold" in failure.error, failure.error
        assert seen and not seen[0][0] and not seen[0][1], seen  # it took a while: seen before it served
        for serving, ready, workers in seen:
            if serving or ready:
                assert workers == 2, seen
        assert late_serving(warm_daemon.target) and late_ready(warm_daemon.target)
        assert check_health(warm_daemon.target, "failing") == health_pb2.HealthCheckResponse.NOT_SERVING
        _, seconds = timed(lambda: manager.model("late")(torch.ones(2)))
        assert seconds < WARM_CALL_SECONDS


def late_serving(target: str) -> bool:
    try:
        return check_health(target, "late") == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:  # a name never loaded: NOT_FOUND
        return False


def late_ready(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
        return bool(stub.ModelReady(grpc_predict_v2_pb2.ModelReadyRequest(name="late"), timeout=10).ready)


@pytest.mark.parametrize(
    ("warmup", "cause"),
    [
        ({"method": "fail", "inputs": ['"boom"'], "repeat": 2}, "warmup call 1 of 2 (fail) raised ValueError: boom"),
        ({"method": "no_such_method", "inputs": []}, "has no method 'no_such_method'"),
        ({"file": "no_such_args.pt"}, "no file 'no_such_args.pt'"),
        ({"file": "../outside_args.pt"}, "outside the package directory"),
        ({"file": "not_a_package.pt"}, "not a torch.save file of arguments"),
        ({"inputs": ["tensor:int8:[300]"]}, "warmup inputs: ARG 'tensor:int8:[300]'"),
    ],
    ids=["raises", "no-method", "missing-file", "outside-file", "not-torch-save", "value-out-of-range"],
)
def test_a_warmup_that_fails_stops_the_start_naming_the_model(
    package_dir: Path, tmp_path: Path, warmup: dict[str, Any], cause: str
) -> None:
    (package_dir.parent / "outside_args.pt").write_bytes(b"")
    config = config_with(tmp_path / "config.yaml", package_dir, [{**SCALE, "warmup": warmup}])
    result = serve(config)
    assert result.returncode == 2, result.stderr
    assert "model 'scale'" in result.stderr and cause in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("warmup", "message"),
    [
        ({"inputs": ["ones:2,x"]}, "ones: takes a shape"),
        ({"inputs": ["tensor:[[1,2],[3]]"]}, "not a tensor of nested JSON lists"),
        ({"inputs": "ones:2"}, "inputs must be a list of ARGs"),
        ({"input": ["ones:2"]}, "must be a mapping with inputs"),
        ({"inputs": ["ones:2"], "repeat": 0}, "repeat must be an integer of at least 1"),
        ({"inputs": ["ones:2"], "file": "x.pt"}, "not both"),
    ],
    ids=["bad-shape", "ragged", "not-a-list", "unknown-key", "repeat-0", "inputs-and-file"],
)
def test_a_bad_warmup_is_a_config_error_naming_the_model(
    package_dir: Path, tmp_path: Path, warmup: dict[str, Any], message: str
) -> None:
    config = config_with(tmp_path / "config.yaml", package_dir, [{**SCALE, "warmup": warmup}])
    result = serve(config)
    assert result.returncode == 2, result.stderr
    assert "models entry 1 (scale) warmup" in result.stderr and message in result.stderr, result.stderr


def test_parse_warmup_reads_every_key() -> None:
    raw = {"inputs": ["ones:1,3", "2"], "kwargs": {"scale": "1.5"}, "method": "forward", "repeat": 3}
    assert parse_warmup(raw, "w") == Warmup(("ones:1,3", "2"), (("scale", "1.5"),), "", "forward", 3)
    assert parse_warmup({"file": "a.pt"}, "w") == Warmup(file="a.pt")
    with pytest.raises(WarmupError, match=r"^w: ARG 'rand:int64:2': rand: makes floating-point"):
        parse_warmup({"inputs": ["rand:int64:2"]}, "w")


def test_a_changed_warmup_file_swaps_the_model_on_reload(
    warm_daemon: DaemonProcess, package_dir: Path, call_log: Path
) -> None:
    torch.save([torch.ones(3), 6.0], package_dir / "warmup" / "slow_args.pt")  # a list: positional
    with InterpreterManager(warm_daemon.target, timeout=60) as manager:
        pids = worker_pids(manager)
        rewrite_models(warm_daemon.config_path, [WARM_ARGS, WARM_FILE])  # the entries as they were
        report = manager.reload()
        assert list(report.swapped) == ["slow_file"] and list(report.unchanged) == ["slow"], report
        assert calls_by_worker(call_log, 6.0) == {pid: 1 for pid in pids}


def test_a_warmup_that_fails_in_a_replacement_evicts_the_model(package_dir: Path, tmp_path: Path) -> None:
    """Its warmup opens a file: fine at start; once the file is gone, a new worker's replay fails,
    and the model is evicted (as any object whose replay fails) instead of restarting workers forever."""
    marker = tmp_path / "present"
    marker.write_text("")
    opens = {"method": "call_module", "inputs": ['"builtins"', '"open"', json.dumps(str(marker))]}
    config = config_with(tmp_path / "config.yaml", package_dir, [{**SCALE, "warmup": opens}])
    daemon = DaemonProcess(config).start()
    try:
        with InterpreterManager(daemon.target, timeout=60) as manager:
            before = worker_pids(manager)
            marker.unlink()
            os.kill(min(before), signal.SIGKILL)
            wait_for_replacement(manager, before)
            with pytest.raises(NotFoundError):
                manager.model("scale")(torch.ones(1))
        assert "warmup call 1 of 1 (call_module) raised FileNotFoundError" in daemon.log, daemon.log
        assert re.search(r"evicted: replaying object 'obj-[0-9a-f]+' \(model scale v1\) into a new worker", daemon.log)
    finally:
        daemon.assert_clean_stop()


def test_the_daemon_checks_warmup_inputs_without_torch() -> None:
    """The daemon never imports torch (tests/test_layers.py): reading a config's warmup ARGs must not either."""
    code = (
        "import sys\n"
        "from server.app.config import load_config\n"
        "from server.models.entry import parse_entries\n"
        "entries = parse_entries([{'name': 'm', 'package': 'p.pt', 'pickle': 'a:b',"
        " 'warmup': {'inputs': ['tensor:int64:[[1,2],[3,4]]', 'rand:2,3', '{\"k\": [1]}'],"
        " 'kwargs': {'x': 'ones:2'}}}])\n"
        "assert entries[0].warmup is not None\n"
        "sys.exit(int('torch' in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"parsing a warmup imported torch{result.stderr}"


def test_a_kserve_v2_load_with_an_entry_runs_its_warmup(warm_daemon: DaemonProcess, call_log: Path) -> None:
    """RepositoryModelLoad's `config` parameter is an entry: its warmup runs as the config's would."""
    warmup = {"inputs": ["tensor:[1,2]"], "kwargs": {"scale": "9"}}
    entry = {"package": "models.pt", "pickle": "models:slow_start.pkl", "warmup": warmup}
    parameters = {"config": grpc_predict_v2_pb2.ModelRepositoryParameter(string_param=json.dumps(entry))}
    with InterpreterManager(warm_daemon.target, timeout=60) as manager:
        pids = worker_pids(manager)
        with grpc.insecure_channel(warm_daemon.target) as channel:
            stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
            load = grpc_predict_v2_pb2.RepositoryModelLoadRequest(model_name="v2slow", parameters=parameters)
            stub.RepositoryModelLoad(load, timeout=60)
            ready = stub.ModelReady(grpc_predict_v2_pb2.ModelReadyRequest(name="v2slow"), timeout=10).ready
        assert ready and calls_by_worker(call_log, 9.0) == {pid: 1 for pid in pids}
        _, seconds = timed(lambda: manager.model("v2slow")(torch.ones(2)))
        assert seconds < WARM_CALL_SECONDS
