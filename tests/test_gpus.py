"""GPUs, on this host's CPUs: `device:` of a model (entry, load_pickle, deployd load --device),
`pool.gpus` binding worker slots to GPUs (CUDA_VISIBLE_DEVICES per worker), a model on cuda:N
placed on GPU N's workers only, and the errors: a device the pool lacks, cuda on a host without
CUDA. CUDA never starts in the daemon nor the fork server (a probe records who calls torch.cuda).

What needs a GPU is in tests/test_gpu_device.py (marked gpu, skipped without one).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from client import InterpreterManager, InvalidArgumentError
from server.app.config import ConfigError, load_config
from server.errors import InvalidArgument
from server.models.devices import bind_slots, parse_device, parse_gpus, resolve_device
from server.models.placement import Placement, choose_slots
from tests.conftest import HERE, write_config
from tests.daemon_process import REPO, DaemonProcess

# Slots 0 and 1 on GPU 0, slot 2 on GPU 1, slot 3 on the CPU alone.
GPUS = ["0=2", 1]
SLOT_GPUS = (0, 0, 1, -1)
ON_CUDA_1 = {"name": "on1", "package": "models.pt", "pickle": "models:scale.pkl", "device": "cuda:1"}


def gpu_config(path: Path, package_dir: Path, models: list[dict[str, Any]] = (), **pool: Any) -> Path:  # type: ignore[assignment]
    config = write_config(path, package_dir, pool={"workers": 4, "gpus": GPUS, **pool})
    settings = yaml.safe_load(config.read_text())
    if models:
        settings["models"] = list(models)
    config.write_text(yaml.safe_dump(settings))
    return config


# ---------------------------------------------------------------------------- units


def test_devices_parse() -> None:
    for device in ("cpu", "auto", "cuda", "cuda:0", "cuda:12"):
        assert parse_device(device) == device
    for bad in ("gpu", "cuda:", "cuda:-1", "cuda:01", "CUDA", "", 0, None):
        with pytest.raises(InvalidArgument, match="device must be cpu, cuda, cuda:N or auto"):
            parse_device(bad)


def test_pool_gpus_bind_the_first_slots_in_order() -> None:
    assert parse_gpus(["0=2", "1"]) == ((0, 2), (1, 1))
    assert bind_slots(((0, 2), (1, 1)), 4) == SLOT_GPUS
    assert bind_slots((), 4) == ()  # no GPUs: the environment as inherited
    for bad, message in ((["x"], "not N or N=WORKERS"), (["0=0"], "at least 1 worker"), (["1", "1=2"], "twice")):
        with pytest.raises(ValueError, match=message):
            parse_gpus(bad)


def test_a_device_resolves_to_its_gpus_workers() -> None:
    assert resolve_device("cpu", SLOT_GPUS) == ("cpu", None)
    assert resolve_device("cuda:0", SLOT_GPUS) == ("cuda", (0, 1))
    assert resolve_device("cuda:1", SLOT_GPUS) == ("cuda", (2,))
    assert resolve_device("cuda", SLOT_GPUS) == ("cuda", (0, 1, 2))
    assert resolve_device("auto", SLOT_GPUS) == ("cuda", (0, 1, 2))
    assert resolve_device("auto", ()) == ("cpu", None)  # no GPUs: auto is cpu
    with pytest.raises(InvalidArgument, match=r"cuda:2: .*no workers on that GPU \(pool\.gpus has cuda:0, cuda:1"):
        resolve_device("cuda:2", SLOT_GPUS)
    with pytest.raises(InvalidArgument, match=r"pool\.gpus is empty"):
        resolve_device("cuda", ())


def test_placement_among_a_devices_slots() -> None:
    gpu0 = (0, 1)
    assert choose_slots(Placement(), 4, [], gpu0) == (0, 1)
    assert choose_slots(Placement(count=1), 4, [(0,)], gpu0) == (1,)
    assert choose_slots(Placement(slots=(1,)), 4, [], gpu0) == (1,)
    with pytest.raises(InvalidArgument, match="worker slot 2 is not on the model's device"):
        choose_slots(Placement(slots=(2,)), 4, [], gpu0)
    with pytest.raises(InvalidArgument, match="more than the 2 workers on the model's device"):
        choose_slots(Placement(count=3), 4, [], gpu0)


def test_config_pool_gpus(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("pool: {gpus: [0=2, 1]}\n")
    config = load_config(path, environ={})
    assert config.worker_count == 3 and config.slot_gpus == (0, 0, 1)  # pool.workers 0: the GPUs' workers
    path.write_text("pool: {workers: 4, gpus: [0=2, 1]}\n")
    assert load_config(path, environ={}).slot_gpus == SLOT_GPUS
    assert load_config(None, environ={"DEPLOYD_POOL_GPUS": "0=2:1", "DEPLOYD_POOL_WORKERS": "4"}).slot_gpus == SLOT_GPUS
    assert load_config(None, environ={}).slot_gpus == ()
    path.write_text("pool: {workers: 2, gpus: [0=2, 1]}\n")
    with pytest.raises(ConfigError, match=r"pool\.workers: 2 is fewer than the 3 workers pool\.gpus binds"):
        load_config(path, environ={})
    path.write_text("pool: {gpus: [zero]}\n")
    with pytest.raises(ConfigError, match=r"bad value for pool\.gpus: 'zero' is not N or N=WORKERS"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("gpus", "device", "message"),
    [
        ("[0]", "cuda:3", r"model 'm': device cuda:3: the pool has no workers on that GPU \(pool.gpus has cuda:0\)"),
        ("[]", "cuda", r"model 'm': device cuda: the pool has no GPU workers"),
        ("[0]", "tpu", r"models entry 1 \(m\): device must be cpu, cuda, cuda:N or auto, got 'tpu'"),
    ],
)
def test_a_model_on_a_device_the_pool_lacks_is_a_config_error(
    tmp_path: Path, gpus: str, device: str, message: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"pool: {{gpus: {gpus}}}\nmodels:\n  - {{name: m, package: m.pt, pickle: a:b, device: '{device}'}}\n"
    )
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_a_model_on_a_missing_gpu_stops_the_start_with_exit_2(tmp_path: Path, package_dir: Path) -> None:
    config = gpu_config(tmp_path / "config.yaml", package_dir, [{**ON_CUDA_1, "device": "cuda:7"}])
    serve = [sys.executable, "-m", "server", "serve", "--config", str(config)]
    done = subprocess.run(serve, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "model 'on1': device cuda:7: the pool has no workers on that GPU" in done.stderr


def test_a_model_on_cuda_on_a_host_without_cuda_fails_to_load_naming_it(tmp_path: Path, package_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    # Without keepers, each worker moves its own copy: the load runs on GPU 1's one worker alone.
    config = gpu_config(tmp_path / "config.yaml", package_dir, [ON_CUDA_1], share_gpu_weights=False)
    serve = [sys.executable, "-m", "server", "serve", "--config", str(config)]
    done = subprocess.run(serve, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert done.returncode == 2, done.stderr
    assert "model 'on1'" in done.stderr and "this host has no CUDA" in done.stderr
    assert "(on worker 2)" in done.stderr and "keeper" not in done.stderr


# ---------------------------------------------------------------------------- a daemon with (fake) GPUs


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("probe") / "cuda_calls"


@pytest.fixture(scope="module")
def gpu_daemon(
    package_dir: Path, tmp_path_factory: pytest.TempPathFactory, probe_file: Path
) -> Iterator[DaemonProcess]:
    config = gpu_config(tmp_path_factory.mktemp("gpus") / "config.yaml", package_dir)
    paths = [str(HERE / "cuda_probe"), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {"DEPLOYD_CUDA_PROBE": str(probe_file), "PYTHONPATH": os.pathsep.join(path for path in paths if path)}
    process = DaemonProcess(config, env=env).start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


def test_each_worker_sees_only_its_gpu(gpu_daemon: DaemonProcess, package_dir: Path) -> None:
    with InterpreterManager(gpu_daemon.target, timeout=60) as manager:
        package = manager.load_package(str(package_dir / "models.pt"))
        seen = {}
        for slot in range(4):
            obj = package.load_pickle("models", "scale.pkl", workers=[slot])
            try:
                seen[slot] = (
                    obj.call_method("call_module", "os", "getenv", "CUDA_VISIBLE_DEVICES"),
                    obj.call_method("call_module", "os", "getenv", "CUDA_DEVICE_ORDER"),
                )
            finally:
                obj.unload()
        assert seen == {0: ("0", "PCI_BUS_ID"), 1: ("0", "PCI_BUS_ID"), 2: ("1", "PCI_BUS_ID"), 3: ("", "PCI_BUS_ID")}
        workers = manager.status().workers
        assert [worker.gpu if worker.HasField("gpu") else -1 for worker in workers] == list(SLOT_GPUS)
        # No NVML here (pynvml is not installed): no GPU readings, rather than zeros or an error.
        assert not any(worker.HasField("gpu_memory_bytes") for worker in workers)


def test_a_model_on_cuda_n_goes_to_gpu_ns_workers_and_fails_there_without_cuda(
    gpu_daemon: DaemonProcess, package_dir: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    with InterpreterManager(gpu_daemon.target, timeout=60) as manager:
        package = manager.load_package(str(package_dir / "models.pt"))
        # The keeper of the model's GPU loads it first (once for that GPU's workers), and says why not.
        for device, gpu in (("cuda:0", 0), ("cuda:1", 1), ("auto", 0)):
            with pytest.raises(InvalidArgumentError) as refused:
                package.load_pickle("models", "scale.pkl", name="gpu_model", device=device)
            details = refused.value.details
            assert f"cannot load model 'gpu_model' on {device}: the keeper of GPU {gpu}:" in details
            assert "this host has no CUDA" in details
        assert not manager.status().objects  # nothing stayed loaded
        with pytest.raises(InvalidArgumentError) as missing:
            package.load_pickle("models", "scale.pkl", device="cuda:4")
        assert "device cuda:4: the pool has no workers on that GPU" in (missing.value.details)
        with pytest.raises(InvalidArgumentError) as outside:
            package.load_pickle("models", "scale.pkl", device="cuda:0", workers=[3])
        assert "worker slot 3 is not on the model's device" in (outside.value.details)
        # The daemon serves on: a model on the CPU loads and answers, on any worker.
        obj = package.load_pickle("models", "scale.pkl", device="cpu")
        try:
            assert obj.call_method("describe", "x") == "x2.0!"
            assert [o.device for o in manager.status().objects] == ["cpu"]
        finally:
            obj.unload()


def test_the_daemon_and_fork_server_never_start_cuda(
    gpu_daemon: DaemonProcess, package_dir: Path, probe_file: Path
) -> None:
    """Only workers and keepers call torch.cuda's device functions. The probe works: a load on
    cuda calls torch.cuda.is_available in GPU 1's keeper (a child of the fork server, as workers
    are), and that call is recorded."""
    with InterpreterManager(gpu_daemon.target, timeout=60) as manager:
        package = manager.load_package(str(package_dir / "models.pt"))
        before = len(probe_file.read_text().splitlines()) if probe_file.exists() else 0
        with pytest.raises(InvalidArgumentError):
            package.load_pickle("models", "scale.pkl", device="cuda:1", workers=[2])
        workers = {worker.pid for worker in manager.status().workers}
    fork_server = {_parent(pid) for pid in workers}
    assert len(fork_server) == 1 and gpu_daemon.pid not in fork_server
    calls = [line.split() for line in probe_file.read_text().splitlines()]
    new = calls[before:]
    assert any(name == "is_available" for _, name in new), calls
    assert {_parent(int(pid)) for pid, _ in new} == fork_server  # the keeper, alive and recorded
    callers = {int(pid) for pid, _ in calls}
    # Workers and keepers may; the daemon and the fork server never.
    assert not callers & (fork_server | {gpu_daemon.pid}), f"torch.cuda called by the daemon or fork server: {calls}"


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def test_a_calls_tensors_go_to_the_models_device() -> None:
    from server.worker.devices import to_device

    meta = torch.device("meta")  # a device with no memory, which every build has
    value = {"x": [torch.ones(2), (torch.zeros(1), 3)], "s": "text"}
    moved = to_device(value, meta)
    assert moved["x"][0].device == meta and moved["x"][1][0].device == meta
    assert moved["x"][1][1] == 3 and moved["s"] == "text"
    assert to_device(value, torch.device("cpu")) is value


def test_deployd_load_device(gpu_daemon: DaemonProcess, package_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    load = [sys.executable, "-m", "deployd_cli", "load", str(package_dir / "models.pt"), "--address", gpu_daemon.target]
    load += ["--pickle", "models:scale.pkl"]
    refused = subprocess.run(
        [*load, "--device", "cuda:9"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )
    assert refused.returncode != 0 and "device cuda:9: the pool has no workers on that GPU" in refused.stderr


def test_cuda_out_of_memory_is_a_load_or_call_failure_naming_what_ran_out() -> None:
    from server.errors import DeviceOutOfMemory, TooLarge, error_from_failure
    from server.ipc import protocol
    from server.worker.devices import out_of_memory_as_failure
    from server.worker.failures import RequestFailed

    with pytest.raises(RequestFailed) as failed, out_of_memory_as_failure("moving the model to cuda:0"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")
    assert failed.value.kind == protocol.FAILURE_OUT_OF_MEMORY
    assert str(failed.value) == "moving the model to cuda:0: CUDA out of memory. Tried to allocate 2.00 GiB"
    error = error_from_failure(protocol.Failure(failed.value.kind, "", str(failed.value), ""), "cannot load model 'm'")
    assert isinstance(error, DeviceOutOfMemory) and isinstance(error, TooLarge)  # RESOURCE_EXHAUSTED


def test_deployd_status_shows_each_workers_gpu(gpu_daemon: DaemonProcess) -> None:
    command = [sys.executable, "-m", "deployd_cli", "status", "--json", "--address", gpu_daemon.target]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shown = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert shown.returncode == 0, shown.stderr
    workers = yaml.safe_load(shown.stdout)["workers"]
    assert [worker.get("gpu") for worker in workers] == [0, 0, 1, None]  # absent: a CPU worker
    assert not any("gpu_memory_bytes" in worker for worker in workers)  # no NVML here


def test_a_session_on_a_model_on_a_device_sends_its_calls_tensors_there() -> None:
    from server.ipc import protocol
    from server.worker.sessions import SessionObjects

    class Recorder:
        def devices(self, x: torch.Tensor, scale: torch.Tensor) -> str:
            return f"{x.device} {scale.device}"

    meta = torch.device("meta")
    devices = {"obj-gpu": meta}
    sessions = SessionObjects(lambda object_id: Recorder(), lambda package_id: None, list, devices.get)
    x = ("tensor", "float32", [2], 0)
    for session, object_id, expected in (("s1", "obj-gpu", "meta meta"), ("s2", "obj-cpu", "cpu cpu")):
        sessions._from_object(protocol.SessionFromObject(session, 1, object_id, ""), [], [])
        call = protocol.ObjCall(session, 2, 1, "devices", [x], {"scale": x})
        sessions._call(call, [memoryview(bytearray(8))], [])
        assert sessions._object(session, 2) == expected
    sessions.close("s1")
    assert sessions.open_count() == 1
