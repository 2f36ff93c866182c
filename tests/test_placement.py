"""Placement: a model on N workers or on named worker slots (a model entry's `workers:`, and
load_pickle(..., workers=)), its calls going only there, kept across a replacement, shown by
Status and `deployd status`, honoured by sessions and by the data ports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import Batching, InterpreterManager, InvalidArgumentError, Retry
from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc
from server.api.health import Health
from server.app.config import ConfigError, load_config
from server.errors import InvalidArgument
from server.models.placement import Placement, choose_slots, parse_placement
from tests.conftest import write_config
from tests.daemon_process import REPO, DaemonProcess, wait_until

# In a pool of 3: `solo` and `other` (workers: 1) land on slots 0 and 1 (the fewest placed
# models, ties to the lowest slot), `pair` on the slots it names, `everywhere` on every worker.
MODELS = [
    {"name": "solo", "package": "models.pt", "pickle": "models:scale.pkl", "workers": 1},
    {"name": "other", "package": "models.pt", "pickle": "models:scale.pkl", "workers": 1},
    {"name": "pair", "package": "models.pt", "pickle": "models:scale.pkl", "workers": [0, 2]},
    {"name": "everywhere", "package": "models.pt", "pickle": "models:scale.pkl"},
]


def placed_config(path: Path, package_dir: Path, models: list[dict[str, Any]], **sections: Any) -> Path:
    sections.setdefault("pool", {}).setdefault("workers", 3)
    config = write_config(path, package_dir, **sections)
    settings = yaml.safe_load(config.read_text())
    settings["models"] = models
    config.write_text(yaml.safe_dump(settings))
    return config


@pytest.fixture(scope="module")
def placed(package_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    config = placed_config(tmp_path_factory.mktemp("placed") / "config.yaml", package_dir, MODELS)
    process = DaemonProcess(config).start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


def slot_pids(manager: InterpreterManager) -> dict[int, int]:
    return {worker.index: worker.pid for worker in manager.status().workers}


def model_slots(manager: InterpreterManager) -> dict[str, list[int]]:
    return {model.name: list(model.worker_slots) for model in manager.status().models}


# ---------------------------------------------------------------------------- units


def test_n_workers_go_to_the_slots_holding_the_fewest() -> None:
    assert choose_slots(Placement(count=1), 3, []) == (0,)
    assert choose_slots(Placement(count=1), 3, [(0,)]) == (1,)
    assert choose_slots(Placement(count=2), 3, [(0,), (0, 2)]) == (1, 2)
    assert choose_slots(Placement(slots=(2,)), 3, [(2,)]) == (2,)
    assert choose_slots(Placement(), 3, [(0,)]) is None  # every worker
    with pytest.raises(InvalidArgument, match="more than the pool's 3 workers"):
        choose_slots(Placement(count=4), 3, [])
    with pytest.raises(InvalidArgument, match="no worker slot 3: the pool has slots 0 to 2"):
        choose_slots(Placement(slots=(0, 3)), 3, [])
    assert parse_placement([2, 0]) == Placement(slots=(0, 2))


@pytest.mark.parametrize(
    ("workers", "message"),
    [
        ("4", "model 'm' workers: workers: 4 is more than the pool's 3 workers"),
        ("[0, 3]", "model 'm' workers: there is no worker slot 3"),
        ("two", r"models entry 1 \(m\) workers: workers must be a number of workers or a list"),
        ("0", r"models entry 1 \(m\) workers: workers must be at least 1"),
        ("[]", r"models entry 1 \(m\) workers: workers must be a number"),
        ("[1, 1]", r"models entry 1 \(m\) workers: worker slots must be distinct"),
        ("true", r"models entry 1 \(m\) workers: workers must be a number"),
    ],
)
def test_a_bad_placement_is_a_config_error_naming_the_model(tmp_path: Path, workers: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"pool: {{workers: 3}}\nmodels:\n  - {{name: m, package: m.pt, pickle: a:b, workers: {workers}}}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_a_placement_bigger_than_the_pool_stops_the_start_with_exit_2(tmp_path: Path, package_dir: Path) -> None:
    models = [{"name": "big", "package": "models.pt", "pickle": "models:scale.pkl", "workers": 5}]
    config = placed_config(tmp_path / "config.yaml", package_dir, models)
    serve = [sys.executable, "-m", "server", "serve", "--config", str(config)]
    done = subprocess.run(serve, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "model 'big' workers" in done.stderr and "more than the pool's 3 workers" in done.stderr


# ---------------------------------------------------------------------------- the daemon path


def test_a_placed_model_answers_only_from_its_slots(placed: DaemonProcess) -> None:
    with InterpreterManager(placed.target, timeout=60) as manager:
        pids = slot_pids(manager)
        assert model_slots(manager) == {"solo": [0], "other": [1], "pair": [0, 2], "everywhere": []}
        assert {manager.model("solo").call_method("pid") for _ in range(30)} == {pids[0]}
        assert {manager.model("other").call_method("pid") for _ in range(30)} == {pids[1]}
        assert {manager.model("pair").call_method("pid") for _ in range(30)} <= {pids[0], pids[2]}
        objects = {obj.object_id: list(obj.worker_slots) for obj in manager.status().objects}
        assert sorted(objects.values()) == [[], [0], [0, 2], [1]]


def test_placement_at_load_time_keeps_through_a_hot_swap(placed: DaemonProcess, package_dir: Path) -> None:
    with InterpreterManager(placed.target, timeout=60) as manager:
        pids = slot_pids(manager)
        package = manager.load_package(package_dir / "models.pt")
        # Slot 0 holds solo and pair, 1 other, 2 pair: one worker is slot 1 (a tie with 2, the lower).
        one = package.load_pickle("models", "scale.pkl", name="runtime", workers=1)
        try:
            assert model_slots(manager)["runtime"] == [1]
            assert {one.call_method("pid") for _ in range(10)} == {pids[1]}
            listed = package.load_pickle("models", "scale.pkl", name="runtime", workers=[2])
            assert listed.version == 2 and model_slots(manager)["runtime"] == [2]
            assert {manager.model("runtime").call_method("pid") for _ in range(10)} == {pids[2]}
            swapped = package.load_pickle("models", "scale.pkl", name="runtime")  # no workers: as before
            assert swapped.version == 3 and model_slots(manager)["runtime"] == [2]
            for bad, message in [([3], "no worker slot 3"), (4, "more than the pool's 3 workers")]:
                with pytest.raises(InvalidArgumentError, match=message):
                    package.load_pickle("models", "scale.pkl", name="runtime", workers=bad)
            with pytest.raises(InvalidArgumentError, match="at least 1"):
                package.load_pickle("models", "scale.pkl", workers=0)
        finally:
            manager.model("runtime").unload()
        assert "runtime" not in model_slots(manager)


def test_a_placed_model_with_batching_batches_on_its_slots_only(placed: DaemonProcess, package_dir: Path) -> None:
    with InterpreterManager(placed.target, timeout=60) as manager:
        pids = slot_pids(manager)
        package = manager.load_package(package_dir / "models.pt")
        model = package.load_pickle("models", "scale.pkl", name="batched", batching=Batching(8, 5.0), workers=[2])
        try:
            with ThreadPoolExecutor(8) as pool:
                doubled = list(pool.map(lambda i: model(torch.full((1, 3), float(i))), range(32)))
                answered_by = set(pool.map(lambda _: model.call_method("pid"), range(32)))
            assert all(torch.equal(out, torch.full((1, 3), 2.0 * i)) for i, out in enumerate(doubled))
            assert answered_by == {pids[2]}
        finally:
            model.unload()


def test_health_of_a_model_none_of_whose_workers_serves_is_not_serving() -> None:
    async def run() -> dict[str, int]:
        health = Health("deployd.v1.Deployd")
        await health.sync(True, {"placed", "everywhere"}, False, stranded={"placed"})
        return {name: int(status) for name, status in health.servicer._server_status.items()}

    statuses = asyncio.run(run())
    assert statuses["placed"] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert statuses["everywhere"] == statuses[""] == health_pb2.HealthCheckResponse.SERVING


def test_a_session_on_a_placed_model_lands_on_its_slot(placed: DaemonProcess) -> None:
    with InterpreterManager(placed.target, timeout=60) as manager:
        pids = slot_pids(manager)
        for _ in range(3):  # the least loaded worker would be another after the first
            with manager.model("other").acquire_session() as session:
                assert session.worker == 1 and session.worker_pid == pids[1]
        with grpc.insecure_channel(placed.target) as channel:
            events = pb_grpc.SessionsStub(channel).OpenSession(
                pb.OpenSessionRequest(object_id="other", worker=0), timeout=30
            )
            with pytest.raises(grpc.RpcError) as refused:
                next(events)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "placed on worker slots 1" in (refused.value.details() or "")


def test_deployd_status_shows_the_slots(placed: DaemonProcess) -> None:
    command = [sys.executable, "-m", "deployd_cli", "status", "--address", placed.target]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shown = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "  solo  serving version 1  on workers 0\n" in shown.stdout
    assert "  pair  serving version 1  on workers 0, 2\n" in shown.stdout
    assert "  everywhere  serving version 1\n" in shown.stdout
    as_json = subprocess.run([*command, "--json"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    models = {model["name"]: model.get("worker_slots") for model in yaml.safe_load(as_json.stdout)["models"]}
    assert models == {"solo": [0], "other": [1], "pair": [0, 2], "everywhere": None}  # absent: every worker


def test_deployd_load_workers(placed: DaemonProcess, package_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    load = [sys.executable, "-m", "deployd_cli", "load", str(package_dir / "models.pt"), "--address", placed.target]
    load += ["--pickle", "models:scale.pkl", "--name", "cli"]
    loaded = subprocess.run([*load, "--workers", "2,"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    try:
        assert loaded.returncode == 0, loaded.stderr
        with InterpreterManager(placed.target, timeout=60) as manager:
            assert model_slots(manager)["cli"] == [2]
        bad = subprocess.run([*load, "--workers", "x"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
        assert bad.returncode == 2 and "--workers takes N or SLOT,SLOT" in bad.stderr
    finally:
        with InterpreterManager(placed.target, timeout=60) as manager:
            manager.model("cli").unload()


# ---------------------------------------------------------------------------- a replacement, data ports


@pytest.fixture
def placed_with_ports(package_dir: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    models = [{"name": "solo", "package": "models.pt", "pickle": "models:scale.pkl", "workers": [1]}]
    config = placed_config(tmp_path / "config.yaml", package_dir, models, pool={"workers": 3, "data_ports": 0})
    process = DaemonProcess(config).start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


def health_of(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=30).status)


def test_data_ports_route_only_to_holders_and_a_replacement_holds_it_again(placed_with_ports: DaemonProcess) -> None:
    target = placed_with_ports.target
    with grpc.insecure_channel(target) as channel:
        answer = pb_grpc.DeploydStub(channel).Endpoints(pb.EndpointsRequest(), timeout=30)
    held = {worker.slot: list(worker.models) for worker in answer.workers}
    assert "solo" in held[1] and "solo" not in held[0] and "solo" not in held[2]
    # A data port asked for a model it does not hold says so.
    stranger = next(worker for worker in answer.workers if worker.slot == 0)
    with grpc.insecure_channel(stranger.address) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.DeploydStub(channel).Invoke(pb.InvokeRequest(object_id="solo", method="pid"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not loaded on worker 0 (it is placed on other workers)" in (refused.value.details() or "")

    retry = Retry(attempts=8, backoff_seconds=0.1, max_backoff_seconds=1.0)
    with InterpreterManager(target, timeout=60, retry=retry) as manager:
        pids = slot_pids(manager)
        model = manager.model("solo")
        assert {model.call_method("pid") for _ in range(30)} == {pids[1]}  # on the data ports: the holder only
        assert health_of(target, "solo") == health_pb2.HealthCheckResponse.SERVING

        os.kill(pids[1], signal.SIGKILL)
        assert wait_until(
            lambda: (
                slot_pids(manager).get(1) not in (None, pids[1])
                and all(worker.state == "idle" or worker.state == "busy" for worker in manager.status().workers)
            ),
            60,
        )
        replacement = slot_pids(manager)[1]
        assert model_slots(manager) == {"solo": [1]}
        assert wait_until(lambda: model.call_method("pid") == replacement, 30)
        assert {model.call_method("pid") for _ in range(20)} == {replacement}
        assert health_of(target, "solo") == health_pb2.HealthCheckResponse.SERVING
        # The replacement holds it again; the workers outside its placement still do not.
        with grpc.insecure_channel(target) as channel:
            answer = pb_grpc.DeploydStub(channel).Endpoints(pb.EndpointsRequest(), timeout=30)
        held = {worker.slot: list(worker.models) for worker in answer.workers}
        assert "solo" in held[1] and "solo" not in held[0] + held[2]


def test_a_reload_moves_a_model_to_its_new_placement(package_dir: Path, tmp_path: Path) -> None:
    entry = {"name": "moving", "package": "models.pt", "pickle": "models:scale.pkl", "workers": [0]}
    config = placed_config(tmp_path / "config.yaml", package_dir, [entry], pool={"workers": 2})
    process = DaemonProcess(config).start()
    try:
        with InterpreterManager(process.target, timeout=60) as manager:
            pids = slot_pids(manager)
            assert {manager.model("moving").call_method("pid") for _ in range(10)} == {pids[0]}
            unplaced = {key: value for key, value in entry.items() if key != "workers"}
            for moved, slots in [(dict(entry, workers=[1]), [1]), (unplaced, [])]:  # moved, then everywhere
                placed_config(config, package_dir, [moved], pool={"workers": 2})
                assert list(manager.reload().swapped) == ["moving"]
                assert model_slots(manager) == {"moving": slots}
            assert {manager.model("moving").call_method("pid") for _ in range(20)} <= set(pids.values())
            placed_config(config, package_dir, [dict(entry, workers=[1])], pool={"workers": 2})
            manager.reload()
            assert {manager.model("moving").call_method("pid") for _ in range(10)} == {pids[1]}
    finally:
        process.assert_clean_stop()
