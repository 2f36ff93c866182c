"""What an operator relies on: metrics, per-object health, call logs, tokens and TLS."""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import stat
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import (
    TLS,
    InterpreterManager,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto.deployd_pb2 import StatusRequest
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, wait_until

ADMIN_TOKEN = "admin-token-3f9a7c"
INVOKE_TOKEN = "invoke-token-81be2d"


def scrape(process: DaemonProcess) -> str:
    match = re.search(r"metrics on (http://\S+)", process.log)
    assert match, process.log
    with urllib.request.urlopen(match.group(1), timeout=10) as response:
        return str(response.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text format (labels in any order)."""
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if found == labels:
            return float(value)
    raise AssertionError(f"no sample {name}{labels}")


def check_health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(response.status)


@pytest.fixture
def metrics_daemon(package_dir: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(write_config(tmp_path / "config.yaml", package_dir), "--metrics-address", "127.0.0.1:0")
    process.start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


def test_metrics_cover_calls_workers_loads_and_memory(metrics_daemon: DaemonProcess, package_dir: Path) -> None:
    with InterpreterManager(metrics_daemon.target, timeout=60, direct=False) as manager:
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
        for _ in range(3):
            scale(torch.ones(1024))
        with pytest.raises(UnavailableError):
            scale.call_method("exit_now", 1)
        text = scrape(metrics_daemon)
        assert sample(text, "deployd_calls_total", method="Invoke", model=scale.id, code="OK", protocol="grpc") == 3
        assert (
            sample(text, "deployd_calls_total", method="Invoke", model=scale.id, code="UNAVAILABLE", protocol="grpc")
            == 1
        )
        assert sample(text, "deployd_calls_total", method="LoadPickle", model="", code="OK", protocol="grpc") == 1
        assert sample(text, "deployd_call_duration_seconds_count", method="LoadPickle", protocol="grpc") == 1
        assert sample(text, "deployd_run_seconds_count", model=scale.id) == 3
        assert sample(text, "deployd_queue_wait_seconds_count") >= 4
        for phase in ("to_worker", "in_worker", "to_daemon"):
            assert sample(text, "deployd_worker_call_seconds_count", phase=phase) >= 3
        assert sample(text, "deployd_load_duration_seconds_count", kind="package") == 1
        assert sample(text, "deployd_load_duration_seconds_count", kind="pickle") == 1
        assert sample(text, "deployd_worker_restarts_total", reason="exited") == 1
        assert sample(text, "deployd_packages_loaded") == 1
        assert sample(text, "deployd_objects_loaded") == 1
        assert sample(text, "deployd_queue_depth") == 0
        assert sample(text, "deployd_workers_busy") == 0
        assert sample(text, "deployd_calls_in_flight") == 0
        assert sample(text, "deployd_workers_serving") in (1, 2)
        assert sample(text, "deployd_message_bytes_total", direction="received", protocol="grpc") > 3 * 4096
        assert sample(text, "deployd_message_bytes_total", direction="sent", protocol="grpc") > 3 * 4096
        for kind in ("rss", "pss", "shared", "private"):
            assert sample(text, "deployd_worker_memory_bytes", worker="0", kind=kind) > 0
        # An unloaded object's series go with it.
        scale.unload()
        assert f'model="{scale.id}"' not in scrape(metrics_daemon)


def test_direct_calls_count_on_the_daemons_metrics(package_dir: Path, tmp_path: Path) -> None:
    """With data ports, each worker counts the calls it answers in files of its own
    (prometheus_client's multiprocess mode), in a directory of the daemon's; /metrics adds them
    to the daemon's own series: a call counts once, in the same series, whichever path it took."""
    config = write_config(
        tmp_path / "config.yaml", package_dir, pool={"data_ports": 0}, metrics={"address": "127.0.0.1:0"}
    )
    daemon = DaemonProcess(config, env={"TMPDIR": str(tmp_path)}).start()
    try:
        [directory] = tmp_path.glob("deployd-metrics-*")
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700

        def invokes() -> float:
            return sample(
                scrape(daemon), "deployd_calls_total", method="Invoke", model="scale", code="OK", protocol="grpc"
            )

        manager = InterpreterManager(daemon.target, timeout=60)
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
        for _ in range(5):
            manager.model("scale")(torch.ones(4))  # straight to a worker
        with InterpreterManager(daemon.target, timeout=60, direct=False) as through_daemon:
            for _ in range(3):
                through_daemon.model("scale")(torch.ones(4))
        text = scrape(daemon)
        assert sample(text, "deployd_calls_total", method="Invoke", model="scale", code="OK", protocol="grpc") == 5 + 3
        # The daemon's dispatcher ran 3 (by object id): the other 5 went straight to a worker.
        runs = [line for line in text.splitlines() if line.startswith("deployd_run_seconds_count{")]
        assert sum(float(line.rpartition(" ")[2]) for line in runs) == 3, runs
        assert sample(text, "deployd_call_duration_seconds_count", method="Invoke", protocol="grpc") == 5 + 3
        assert sample(text, "deployd_calls_in_flight") == 0
        assert sample(text, "deployd_message_bytes_total", direction="received", protocol="grpc") > 8 * 16
        assert text.count("# TYPE deployd_calls_total counter") == 1  # one family, not one per process

        # Killed workers: their counts stay, and their files do not pile up.
        counted = 8
        with manager:
            for round_ in range(10):
                # Each slot in turn: a slot's crash-loop backoff doubles with each death there.
                victim = manager.status().workers[round_ % 2].pid
                os.kill(victim, signal.SIGKILL)
                assert invokes() >= counted
                assert wait_until(lambda v=victim: _serving_without(manager, v), 60)
                manager.model("scale")(torch.ones(4))
                counted += 1
                assert invokes() == counted
                live = {str(worker.pid) for worker in manager.status().workers} | {"archive"}
                files = os.listdir(directory)
                assert {name.rpartition("_")[2].removesuffix(".db") for name in files} <= live, files
            assert sample(scrape(daemon), "deployd_calls_in_flight") == 0
            # An unloaded model's series go, the workers' with the daemon's.
            scale.unload()
            assert 'model="scale"' not in scrape(daemon)
    finally:
        daemon.assert_clean_stop()
    assert not directory.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run workers as another user")
def test_workers_of_another_user_count_their_calls(package_dir: Path, tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    config = write_config(
        tmp_path / "config.yaml",
        package_dir,
        pool={"workers": 1, "data_ports": 0},
        worker={"user": "nobody"},
        metrics={"address": "127.0.0.1:0"},
    )
    daemon = DaemonProcess(config).start()  # its directory in /tmp: nobody cannot reach into tmp_path
    try:
        [directory] = Path(tempfile.gettempdir()).glob(f"deployd-metrics-{daemon.pid}-*")
        mode = directory.stat()
        assert (stat.S_IMODE(mode.st_mode), mode.st_gid) == (0o770, nobody.pw_gid)
        with InterpreterManager(daemon.target, timeout=60) as manager:
            manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl", name="scale")
            for _ in range(3):
                manager.model("scale")(torch.ones(4))
            text = scrape(daemon)
            assert sample(text, "deployd_calls_total", method="Invoke", model="scale", code="OK", protocol="grpc") == 3
            assert {path.stat().st_uid for path in directory.iterdir()} == {nobody.pw_uid}
    finally:
        daemon.assert_clean_stop()
    assert not directory.exists()


def _serving_without(manager: InterpreterManager, pid: int) -> bool:
    workers = manager.status().workers
    return len(workers) == 2 and all(worker.state == "idle" and worker.pid != pid for worker in workers)


def test_health_per_object_follows_loads(daemon: DaemonProcess, package_dir: Path) -> None:
    serving, unknown = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    with InterpreterManager(daemon.target, timeout=60) as manager:
        echo = manager.load_package(package_dir / "models.pt").load_pickle("models", "echo.pkl")
        assert check_health(daemon.target, echo.id) == serving
        assert check_health(daemon.target, "") == serving
        echo.unload()
        assert check_health(daemon.target, echo.id) == unknown
    with grpc.insecure_channel(daemon.target) as channel, pytest.raises(grpc.RpcError) as raised:
        request = health_pb2.HealthCheckRequest(service="obj-never-loaded")
        health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_one_log_line_per_call(package_dir: Path, tmp_path: Path, log_format: str) -> None:
    config = write_config(tmp_path / "config.yaml", package_dir, server={"log_format": log_format})
    process = DaemonProcess(config).start()
    try:
        with InterpreterManager(process.target, timeout=60, token="not-configured-so-ignored") as manager:
            scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
            secret_values = torch.full((4,), 12345.678)
            scale(secret_values)
            manager._stub.Status(StatusRequest(), metadata=(("x-request-id", "req-42"),), timeout=60)
    finally:
        process.assert_clean_stop()
    calls = [line for line in process.lines if "deployd.calls" in line]
    # LoadPackage, LoadPickle, Endpoints (the client asks once where the workers serve), Invoke, Status
    assert len(calls) == 5, calls
    if log_format == "json":
        entries = [json.loads(line) for line in calls]
        invoke = next(entry for entry in entries if entry["method"] == "Invoke")
        assert invoke["object"] == scale.id and invoke["status"] == "OK" and invoke["duration_ms"] > 0
        assert invoke["request_id"]
        assert next(entry for entry in entries if entry["method"] == "Status")["request_id"] == "req-42"
    else:
        invoke_line = next(line for line in calls if "method=Invoke" in line)
        assert f"object={scale.id}" in invoke_line and "status=OK" in invoke_line and "duration_ms=" in invoke_line
        assert any("request_id=req-42" in line for line in calls)
    assert "12345" not in process.log and "not-configured-so-ignored" not in process.log


# ---------------------------------------------------------------------------- tokens and TLS


@pytest.fixture
def token_daemon(package_dir: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    config = write_config(
        tmp_path / "config.yaml",
        package_dir,
        auth={"admin_tokens": [ADMIN_TOKEN], "invoke_tokens": [INVOKE_TOKEN]},
    )
    process = DaemonProcess(config, "--metrics-address", "127.0.0.1:0").start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


def test_tokens_and_roles(token_daemon: DaemonProcess, package_dir: Path) -> None:
    target = token_daemon.target
    with InterpreterManager(target, timeout=60, token=ADMIN_TOKEN) as admin:
        scale = admin.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
    with InterpreterManager(target, timeout=60, token=INVOKE_TOKEN) as invoker:
        assert torch.equal(
            invoker.status() and scale.__class__(invoker, scale.id)(torch.ones(1)), torch.full((1,), 2.0)
        )
        with pytest.raises(PermissionDeniedError, match="LoadPackage needs an admin token"):
            invoker.load_package(package_dir / "models.pt")
        with pytest.raises(PermissionDeniedError, match="UnloadObject needs an admin token"):
            scale.__class__(invoker, scale.id).unload()
    for token in (None, "", "wrong-token", ADMIN_TOKEN + "x"):
        with InterpreterManager(target, timeout=60, token=token or "") as stranger:
            stranger._metadata = () if token is None else stranger._metadata
            with pytest.raises(UnauthenticatedError):
                stranger.status()
    # Health stays open for probes; refusals are counted; tokens never reach the log.
    assert check_health(target, "") == health_pb2.HealthCheckResponse.SERVING
    text = scrape(token_daemon)
    assert sample(text, "deployd_calls_total", method="Status", model="", code="UNAUTHENTICATED", protocol="grpc") >= 3
    assert ADMIN_TOKEN not in token_daemon.log and INVOKE_TOKEN not in token_daemon.log


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by it."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=deployd-test-ca")
    for name, extension in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"), ("client", "")):
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=deployd-test-{name}")
        (directory / f"{name}.ext").write_text(extension + "\n" if extension else "basicConstraints=CA:FALSE\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial")
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
        )  # fmt: skip
    return {name: directory / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_tls(package_dir: Path, tmp_path: Path, mutual: bool) -> None:
    certs = make_certificates(tmp_path)
    tls_config = {"cert_file": str(certs["server.pem"]), "key_file": str(certs["server.key"])}
    if mutual:
        tls_config["client_ca_file"] = str(certs["ca.pem"])
    process = DaemonProcess(write_config(tmp_path / "config.yaml", package_dir, tls=tls_config)).start()
    try:
        client_cert = {"cert": certs["client.pem"], "key": certs["client.key"]} if mutual else {}
        with InterpreterManager(process.target, timeout=60, tls=TLS(ca=certs["ca.pem"], **client_cert)) as manager:
            scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
            assert torch.equal(scale(torch.ones(1)), torch.full((1,), 2.0))
        with InterpreterManager(process.target, timeout=5) as plaintext, pytest.raises(UnavailableError):
            plaintext.status()
        if mutual:
            no_certificate = TLS(ca=certs["ca.pem"])
            anonymous = InterpreterManager(process.target, timeout=5, tls=no_certificate)
            with anonymous, pytest.raises(UnavailableError):
                anonymous.status()
    finally:
        process.assert_clean_stop()


def _deeply_nested_invoke(levels: int) -> bytes:
    """An InvokeRequest whose argument nests `levels` lists, written by hand: protobuf itself
    refuses to build one past its depth limit."""
    value = pb.Value(int_value=1).SerializeToString()
    for _ in range(levels):
        items = b"\x0a" + _varint(len(value)) + value  # ListValue.items = 1
        value = b"\x42" + _varint(len(items)) + items  # Value.list_value = 8
    return pb.InvokeRequest(object_id="x").SerializeToString() + b"\x1a" + _varint(len(value)) + value  # args = 3


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x0a\x02\xff\xfe", r"InvokeRequest: a string field holds bytes that are not valid UTF-8"),
        (_deeply_nested_invoke(120), r"InvokeRequest: it nests messages deeper than protobuf's limit"),
        (b"\xff\xff\xff", r"not a valid deployd\.v1\.InvokeRequest"),
    ],
    ids=["bad-utf8", "too-deep", "garbage"],
)
def test_request_that_does_not_parse(metrics_daemon: DaemonProcess, payload: bytes, message: str) -> None:
    """INVALID_ARGUMENT with a message a person can act on, counted and logged like any call."""
    with grpc.insecure_channel(metrics_daemon.target) as channel:
        invoke = channel.unary_unary("/deployd.v1.Deployd/Invoke")  # raw bytes both ways
        with pytest.raises(grpc.RpcError) as raised:
            invoke(payload, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(message, raised.value.details()), raised.value.details()
        load = channel.stream_unary("/deployd.v1.Deployd/LoadPackage")
        with pytest.raises(grpc.RpcError) as raised:
            load(iter([pb.LoadPackageRequest(chunk=b"PK").SerializeToString(), b"\x12\x01\xff"]), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "LoadPackageRequest" in raised.value.details()
    text = scrape(metrics_daemon)
    assert sample(text, "deployd_calls_total", method="Invoke", model="", code="INVALID_ARGUMENT", protocol="grpc") == 1
    assert (
        sample(text, "deployd_calls_total", method="LoadPackage", model="", code="INVALID_ARGUMENT", protocol="grpc")
        == 1
    )
    assert sample(text, "deployd_message_bytes_total", direction="received", protocol="grpc") >= len(payload)
    assert any("method=Invoke" in line and "status=INVALID_ARGUMENT" in line for line in metrics_daemon.lines)
    with InterpreterManager(metrics_daemon.target, timeout=60) as manager:
        assert manager.status().workers
