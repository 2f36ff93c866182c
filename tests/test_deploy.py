"""deploy/: the Dockerfile's command run outside Docker, the compose file, the data ports the
image serves and publishes, Prometheus and Grafana's files. No Docker engine needed:
docker-compose and promtool only parse."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import InterpreterManager
from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc
from server.app.config import load_config
from tests.daemon_process import REPO, DaemonProcess
from tests.tools import require_program

DEPLOY = REPO / "deploy"
IMAGE_CONFIG = "/etc/deployd/config.yaml"
DATASOURCE_UID = "deployd-prometheus"
# Every metric the dashboard must show (README: Operating it).
DASHBOARD_METRICS = {
    "deployd_calls_total",
    "deployd_call_duration_seconds",
    "deployd_queue_wait_seconds",
    "deployd_run_seconds",
    "deployd_calls_in_flight",
    "deployd_queue_depth",
    "deployd_workers_serving",
    "deployd_workers_busy",
    "deployd_worker_restarts_total",
    "deployd_packages_loaded",
    "deployd_objects_loaded",
    "deployd_load_duration_seconds",
    "deployd_message_bytes_total",
    "deployd_worker_memory_bytes",
}
# Grafana's variables, as values Prometheus accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$memory_kind": "pss"}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    lines = DEPLOY.joinpath("Dockerfile").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#")).replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(arguments.split())))
    return instructions


def dockerfile(keyword: str) -> str:
    """The arguments of the last such instruction (the one Docker uses)."""
    found = [arguments for name, arguments in dockerfile_instructions() if name == keyword]
    assert found, f"deploy/Dockerfile has no {keyword}"
    return found[-1]


def arg_defaults() -> dict[str, str]:
    """Each ARG's default (the value a build without --build-arg uses)."""
    defaults = {}
    for name, arguments in dockerfile_instructions():
        if name == "ARG":
            key, _, value = arguments.partition("=")
            defaults[key] = value
    return defaults


def with_defaults(text: str) -> str:
    """${NAME:-word} as a build without --build-arg expands it (every ARG it is used with defaults to empty)."""
    defaults = arg_defaults()
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda match: defaults[match[1]] or match[2], text)


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list) and all(isinstance(part, str) for part in parsed), arguments
    return parsed


def healthcheck_command() -> list[str]:
    _options, _, command = dockerfile("HEALTHCHECK").partition("CMD ")
    assert command, "HEALTHCHECK needs a CMD"
    return exec_form(command)


def resolve_program(command: list[str]) -> list[str]:
    """The command with its program found in this venv first (where `deployd` is installed)."""
    path = shutil.which(command[0], path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert path, f"{command[0]} not found"
    return [path, *command[1:]]


def image_command() -> list[str]:
    """ENTRYPOINT + CMD without the init (tini --), with the image's config path pointing at deploy/config.yaml."""
    command = exec_form(dockerfile("ENTRYPOINT")) + exec_form(dockerfile("CMD"))
    assert command[:2] == ["tini", "--"], f"tini must be the init: {command}"
    command = [str(DEPLOY / "config.yaml") if part == IMAGE_CONFIG else part for part in command[2:]]
    return resolve_program(command)


class ImageDaemon(DaemonProcess):
    """The daemon as the image starts it, outside Docker: the command parsed from the Dockerfile."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        super().__init__(DEPLOY / "config.yaml")
        self._command = command
        # Only our DEPLOYD_ settings: one in the caller's environment must not move the daemon off loopback.
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("DEPLOYD_")} | env

    def command(self) -> list[str]:
        return self._command


def loopback_env(packages: Path, workers: int = 1) -> dict[str, str]:
    """The image's daemon on loopback and any free ports, although its config binds 0.0.0.0
    (the data ports too: 0.0.0.0:50100 + slot)."""
    return {
        "DEPLOYD_SERVER_ADDRESS": "127.0.0.1:0",
        "DEPLOYD_METRICS_ADDRESS": "127.0.0.1:0",
        "DEPLOYD_SERVER_HTTP_ADDRESS": "127.0.0.1:0",
        "DEPLOYD_POOL_DATA_PORTS": "0",
        "DEPLOYD_POOL_DATA_HOST": "127.0.0.1",
        "DEPLOYD_PACKAGES_DIRECTORY": str(packages),
        "DEPLOYD_POOL_WORKERS": str(workers),
        "DEPLOYD_AUTH_ADMIN_TOKENS": "test-admin-token",
    }


@pytest.fixture
def image_daemon(tmp_path: Path) -> ImageDaemon:
    """Started on loopback and port 0 although the image's config binds 0.0.0.0."""
    return ImageDaemon(image_command(), loopback_env(tmp_path))


def health(target: str) -> int:
    """grpc.health.v1 Check for the whole server, without a token (as Docker's HEALTHCHECK asks)."""
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    status: int = response.status
    return status


def test_image_command_serves_and_stops_cleanly(image_daemon: ImageDaemon) -> None:
    assert image_command()[1:] == ["serve", "--config", str(DEPLOY / "config.yaml")]
    image_daemon.start()
    try:
        assert re.search(r"listening on 127\.0\.0\.1:\d+", image_daemon.log), image_daemon.log
        assert re.search(r"metrics on http://127\.0\.0\.1:\d+/metrics", image_daemon.log), image_daemon.log
        assert re.search(r"http on 127\.0\.0\.1:\d+", image_daemon.log), image_daemon.log
        assert "0.0.0.0" not in image_daemon.log
        assert health(image_daemon.target) == health_pb2.HealthCheckResponse.SERVING
    finally:
        image_daemon.assert_clean_stop()  # SIGTERM: exit 0, no child process or shared memory left


def test_image_config_refuses_to_start_without_a_token() -> None:
    # The image binds 0.0.0.0: without DEPLOYD_AUTH_*_TOKENS it must not serve anyone who reaches the port.
    env = {key: value for key, value in os.environ.items() if not key.startswith("DEPLOYD_")}
    result = subprocess.run(image_command(), cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "no auth tokens" in result.stderr


def test_healthcheck_command(image_daemon: ImageDaemon) -> None:
    command = healthcheck_command()
    assert command[:2] == ["deployd", "health"], f"HEALTHCHECK must run `deployd health`: {command}"
    assert "127.0.0.1:50051" in command
    image_daemon.start()
    try:
        check = resolve_program([image_daemon.target if part == "127.0.0.1:50051" else part for part in command])
        serving = subprocess.run(check, capture_output=True, text=True, timeout=30)
        assert serving.returncode == 0, f"{check} exited {serving.returncode} on a serving daemon:\n{serving.stderr}"
    finally:
        image_daemon.assert_clean_stop()
    stopped = subprocess.run(check, capture_output=True, text=True, timeout=30)
    assert stopped.returncode != 0, f"{check} exited 0 with no daemon listening"


def test_dockerfile_choices() -> None:
    instructions = dockerfile_instructions()
    assert dockerfile("FROM") == "${BASE_IMAGE}"
    assert dockerfile("USER") == "deployd"
    assert set(dockerfile("EXPOSE").split()) == {"50051", "8000", "9464", "50100-50107"}
    assert "/var/lib/deployd/packages" in dockerfile("VOLUME")
    assert any(
        name == "ARG" and args.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
        for name, args in instructions
    )
    runs = [args for name, args in instructions if name == "RUN"]
    assert any("--index-url" in run and "$TORCH_INDEX_URL" in run and "-c constraints.txt" in run for run in runs)
    assert any("pip install -c constraints.txt ." in run for run in runs)
    assert any("tini" in run for run in runs)
    copies = [with_defaults(args).split() for name, args in instructions if name == "COPY"]
    assert ["deploy/config.yaml", IMAGE_CONFIG] in copies
    for sources in (copy[:-1] for copy in copies):
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such file in the build context"
    # Every package pyproject.toml installs is in the image (a new one is easy to forget).
    included = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {source for copy in copies for source in copy[:-1]}
    assert {pattern.rstrip("*") for pattern in included} <= copied


def image_config(**environ: str) -> object:
    """deploy/config.yaml through the daemon's own parser, with a token (it binds 0.0.0.0)."""
    return load_config(DEPLOY / "config.yaml", environ={"DEPLOYD_AUTH_ADMIN_TOKENS": "token", **environ})


def published_data_ports() -> tuple[int, int]:
    """The first and last data port docker-compose.yml publishes (HOST_IP:FIRST-LAST:FIRST-LAST)."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["deployd"]
    ranges = [port for port in compose["ports"] if "-" in port]
    assert len(ranges) == 1, f"docker-compose.yml should publish one range of data ports: {compose['ports']}"
    host_ip, host_range, container_range = ranges[0].split(":")
    assert host_ip == "127.0.0.1", "the data ports on the host's loopback, as the daemon's port"
    assert host_range == container_range, "the daemon advertises the container's port numbers: publish the same"
    first, last = (int(part) for part in host_range.split("-"))
    return first, last


def test_image_data_ports_line_up_with_what_is_published() -> None:
    """Worker slot i serves on pool.data_ports + i, bound as the daemon's own address; the image
    EXPOSEs and compose publishes the same range, on the numbers the daemon advertises, at the
    host (127.0.0.1) where compose publishes them; DEPLOYD_POOL_WORKERS beyond the range is documented."""
    first, last = published_data_ports()
    config = image_config(DEPLOYD_POOL_WORKERS=str(last - first + 1))
    assert config.pool.data_ports == first, "compose publishes from the image's first data port"
    assert config.data_host == "0.0.0.0" == config.server.address.rpartition(":")[0]
    assert config.server.advertise_host == "127.0.0.1"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["deployd"]
    assert "127.0.0.1:50051:50051" in compose["ports"]
    assert f"{first}-{last}" in dockerfile("EXPOSE").split()
    # The env file's overrides name the count that fits the published range.
    example = (DEPLOY / "deployd.env.example").read_text()
    assert "DEPLOYD_POOL_WORKERS" in example and f"{first}-{last}" in example
    assert "DEPLOYD_SERVER_ADVERTISE_HOST" in example


def test_image_command_serves_data_ports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The image's config with two workers: Endpoints tells a client on the host 127.0.0.1 and a
    port per worker, each answers Invoke as the daemon does, and the Python client takes them."""
    subprocess.run([sys.executable, str(REPO / "scripts" / "export_seed.py"), str(tmp_path / "seed.pt")], check=True)
    daemon = ImageDaemon(image_command(), loopback_env(tmp_path, workers=2)).start()
    metadata = (("authorization", "Bearer test-admin-token"),)
    try:
        assert len(re.findall(r"worker \d serves calls on 127\.0\.0\.1:\d+", daemon.log)) == 2, daemon.log
        with InterpreterManager(daemon.target, token="test-admin-token", timeout=60) as manager:
            manager.load_package(server_path="seed.pt").load_pickle("model", "model.pkl", name="seed")
            x = torch.rand(1, 1, 10, 10)
            request = pb.InvokeRequest(object_id="seed", args=[tensor_value(x)])
            with grpc.insecure_channel(daemon.target) as channel:
                stub = pb_grpc.DeploydStub(channel)
                answer = stub.Endpoints(pb.EndpointsRequest(), timeout=30, metadata=metadata)
                by_daemon = stub.Invoke(request, timeout=60, metadata=metadata).result
            assert len(answer.workers) == 2
            assert all(worker.address.startswith("127.0.0.1:") for worker in answer.workers), answer
            for worker in answer.workers:
                with grpc.insecure_channel(worker.address) as channel:
                    direct = pb_grpc.DeploydStub(channel).Invoke(request, timeout=60, metadata=metadata).result
                assert direct == by_daemon, f"{worker.address} answered otherwise than the daemon"
            expected = torch.frombuffer(bytearray(by_daemon.tensor_value.data), dtype=torch.float32)
            for _ in range(4):
                assert torch.equal(manager.model("seed")(x).flatten(), expected)
        assert not [record for record in caplog.records if "cannot be reached" in record.getMessage()]
    finally:
        daemon.assert_clean_stop()


def tensor_value(tensor: torch.Tensor) -> pb.Value:
    data = tensor.numpy().tobytes()
    return pb.Value(tensor_value=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(tensor.shape), data=data))


def test_dockerfile_builds_offline_only_when_asked() -> None:
    # The default build is the networked one: python:3.11-slim, torch and the rest from the indexes.
    # BASE_IMAGE and WHEELHOUSE (scripts/image_test.sh) swap in a local image and a wheelhouse.
    instructions = dockerfile_instructions()
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim"), "ARG BASE_IMAGE must come before FROM"
    assert [name for name, _ in instructions].count("FROM") == 1
    assert arg_defaults()["WHEELHOUSE"] == ""
    copies = [args for name, args in instructions if name == "COPY"]
    assert "constraints.txt ${WHEELHOUSE:-constraints.txt} ./" in copies
    runs = [args for name, args in instructions if name == "RUN"]
    offline = "${WHEELHOUSE:+--no-index --find-links /tmp/deployd-src}"
    assert [run for run in runs if "pip install" in run and offline not in run] == []
    # Without WHEELHOUSE the COPY brings constraints.txt alone, and pip uses the indexes.
    assert with_defaults("COPY constraints.txt ${WHEELHOUSE:-constraints.txt} ./") == (
        "COPY constraints.txt constraints.txt ./"
    )
    # A base image with tini already (an offline one) skips apt-get; python:3.11-slim runs it.
    [tini] = [run for run in runs if "tini" in run]
    assert tini.startswith("command -v tini >/dev/null || (apt-get update")


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    ignored = {line for line in lines if line and not line.startswith("#")}
    assert {".git", ".venv", "bench/results", "deploy/deployd.env", "**/node_modules"} <= ignored
    # build/ is left out of the context, except the wheelhouse an offline build copies (after it: last match wins).
    assert lines.index("!build/wheelhouse") > lines.index("build")


def compose_config(tmp_path: Path) -> dict[str, object]:
    """docker-compose's resolved view of deploy/docker-compose.yml, in a copy with deployd.env made from the example."""
    docker_compose = require_program("docker-compose")
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("deployd.env"))
    shutil.copy(copy / "deployd.env.example", copy / "deployd.env")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("COMPOSE_", "DEPLOYD_"))}
    result = subprocess.run(
        [docker_compose, "-f", str(copy / "docker-compose.yml"), "config"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, object] = yaml.safe_load(result.stdout)
    return config


def test_compose_file(tmp_path: Path) -> None:
    config = compose_config(tmp_path)
    services = config["services"]
    assert isinstance(services, dict) and set(services) == {"deployd", "prometheus", "grafana"}
    deployd = services["deployd"]
    assert deployd["build"] == {"context": str(tmp_path), "dockerfile": "deploy/Dockerfile"}
    assert deployd["shm_size"] == "2gb"
    assert deployd["environment"]["DEPLOYD_AUTH_ADMIN_TOKENS"]  # from deployd.env
    assert "127.0.0.1:50051:50051/tcp" in deployd["ports"]
    assert "127.0.0.1:8000:8000/tcp" in deployd["ports"]  # KServe v2 over HTTP
    # The data ports, one entry each in docker-compose's view, on the host's loopback.
    first, last = published_data_ports()
    assert {f"127.0.0.1:{port}:{port}/tcp" for port in range(first, last + 1)} <= set(deployd["ports"])
    assert any(volume.startswith("packages:/var/lib/deployd/packages") for volume in deployd["volumes"])
    assert "healthcheck" not in deployd  # the image's HEALTHCHECK applies
    # Every file the services mount exists in deploy/.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("/"):
                relative = Path(source).relative_to(tmp_path / "deploy")
                assert (DEPLOY / relative).exists(), f"{volume}: deploy/{relative} does not exist"


def test_deployd_env_is_ignored_by_git() -> None:
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "/deploy/deployd.env" in ignored, "deploy/deployd.env (tokens) must be in .gitignore"
    example = (DEPLOY / "deployd.env.example").read_text()
    assert "DEPLOYD_AUTH_ADMIN_TOKENS=" in example and "DEPLOYD_AUTH_INVOKE_TOKENS=" in example


def test_prometheus_config() -> None:
    promtool = require_program("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "5s"
    [job] = config["scrape_configs"]
    assert job["job_name"] == "deployd"
    assert job["static_configs"][0]["targets"] == ["deployd:9464"]
    image_config = yaml.safe_load((DEPLOY / "config.yaml").read_text())
    assert image_config["metrics"]["address"].endswith(":9464")


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "deployd.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def prometheus_query(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_grafana_dashboard(tmp_path: Path) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "deployd.json").read_text())
    assert dashboard["uid"] == "deployd"
    assert 36 <= dashboard["schemaVersion"] <= 41
    [datasource] = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["uid"] == DATASOURCE_UID and datasource["url"] == "http://prometheus:9090"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
            assert all(target["datasource"]["uid"] == DATASOURCE_UID for target in panel["targets"]), panel["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    queries = dashboard_queries()
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"deployd_[a-z_]+", " ".join(queries))}
    assert used >= DASHBOARD_METRICS, f"no panel for {DASHBOARD_METRICS - used}"
    assert any('code!="OK"' in query for query in queries)
    # Every query is valid PromQL: promtool parses each as a recording rule.
    promtool = require_program("promtool")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{index}", "expr": prometheus_query(query)} for index, query in enumerate(queries)
    ]}]}  # fmt: skip
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_compose() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/deployd.yml").read_text())["providers"][0]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["grafana"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in compose["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in compose["volumes"]
    home = compose["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/deployd.json"
