"""deploy/kubernetes/: every manifest against the Kubernetes API schema (kubernetes-validate,
strict: unknown fields fail), and what a schema cannot see: that the manifests agree with each
other, with the daemon (its config parser, health names, shutdown) and with the image. The last
test runs the pod's two commands outside Kubernetes: the seed-model initContainer, then the
daemon with the ConfigMap's config and the Deployment's environment, called through its port and
straight on its workers' data ports as a client in the cluster would. No cluster needed."""

from __future__ import annotations

import inspect
import json
import math
import re
import shutil
import subprocess
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import InterpreterManager
from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc
from server import logs
from server.api.deployd_v1 import SERVICE_NAME
from server.api.health import Health
from server.app.config import Config, ConfigError, load_config, split_address
from tests.daemon_process import REPO, DaemonProcess

# The Kubernetes version the manifests are written for and checked against (one of
# kubernetes-validate's schemas; it uses the newest schema not newer than this).
KUBERNETES_VERSION = "1.33.0"
KUBE = REPO / "deploy" / "kubernetes"
KUSTOMIZATION = "kustomization.yaml"
CONTAINER = "deployd"
SECRET = "deployd-tokens"
# A pod IP, standing in for the kubelet's status.podIP (DEPLOYD_SERVER_ADVERTISE_HOST).
POD_IP = "10.244.1.7"
DATA_PORT_PREFIX = "data-"
# What the daemon and its fork server hold beside the workers and /dev/shm (torch imported once).
DAEMON_MEMORY_BYTES = 512 * 1024**2

_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIXES = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "2", "4Gi") as a number."""
    match = _QUANTITY.match(str(value))
    assert match and match.group(2) in _SUFFIXES, f"not a quantity this test reads: {value!r}"
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


def manifest_files() -> list[Path]:
    return sorted(path for path in KUBE.glob("*.yaml") if path.name != KUSTOMIZATION)


@cache
def documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, resource) for every resource of every manifest."""
    found = []
    for path in manifest_files():
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                found.append((path.name, document))
    return tuple(found)


def resources(kind: str) -> list[dict[str, Any]]:
    return [document for _, document in documents() if document["kind"] == kind]


def resource(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [item for item in resources(kind) if name is None or item["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/kubernetes/, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = resource("Deployment")["spec"]["template"]["spec"]
    return spec


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def container() -> dict[str, Any]:
    found = [item for item in pod_spec()["containers"] if item["name"] == CONTAINER]
    assert len(found) == 1, f"the pod needs one container named {CONTAINER}"
    return found[0]


def env_source(name: str) -> dict[str, Any]:
    found = [item for item in container().get("env", []) if item["name"] == name]
    assert len(found) == 1, f"the {CONTAINER} container must set {name} once"
    assert "valueFrom" in found[0], f"{name} must come from valueFrom, not a literal value"
    source: dict[str, Any] = found[0]["valueFrom"]
    return source


def container_ports(item: dict[str, Any] | None = None) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in (item or container())["ports"]}


def data_ports_declared(ports: dict[str, int]) -> dict[str, int]:
    """The workers' data ports among named ports (data-0, data-1, ...)."""
    return {name: port for name, port in ports.items() if name.startswith(DATA_PORT_PREFIX)}


def volume(name: str) -> dict[str, Any]:
    found = [item for item in pod_spec()["volumes"] if item["name"] == name]
    assert len(found) == 1, f"no volume {name!r} in the pod"
    return found[0]


def mount_at(path: str, item: dict[str, Any] | None = None) -> dict[str, Any]:
    found = [mount for mount in (item or container())["volumeMounts"] if mount["mountPath"] == path]
    assert len(found) == 1, f"nothing is mounted at {path}"
    return found[0]


def kubelet_cpu_value() -> str:
    """What the kubelet puts in DEPLOYD_POOL_WORKERS: the CPU limit over the divisor, rounded up."""
    field = env_source("DEPLOYD_POOL_WORKERS")["resourceFieldRef"]
    divisor = quantity(field.get("divisor", "1"))
    return str(math.ceil(quantity(container()["resources"]["limits"]["cpu"]) / divisor))


def pod_environment(**extra: str) -> dict[str, str]:
    """The daemon's DEPLOYD_* environment in the pod, with tokens standing in for the Secret's."""
    return {
        "DEPLOYD_POOL_WORKERS": kubelet_cpu_value(),
        "DEPLOYD_SERVER_ADVERTISE_HOST": POD_IP,
        "DEPLOYD_AUTH_INVOKE_TOKENS": "invoke-token",
        "DEPLOYD_AUTH_ADMIN_TOKENS": "admin-token",
        **extra,
    }


def config_map() -> dict[str, Any]:
    name = volume("config")["configMap"]["name"]
    return resource("ConfigMap", name)


def config_path() -> str:
    """The --config the container's arguments give."""
    args = container()["args"]
    assert "--config" in args, f"the container must name its config file: {args}"
    path: str = args[args.index("--config") + 1]
    return path


def write_config(tmp_path: Path) -> Path:
    key = Path(config_path()).name
    data = config_map()["data"]
    assert key in data, f"ConfigMap {config_map()['metadata']['name']} has no key {key}"
    path = tmp_path / key
    path.write_text(data[key])
    return path


def pod_config(tmp_path: Path) -> Config:
    """The ConfigMap's config.yaml through the daemon's own parser, with the pod's environment."""
    return load_config(write_config(tmp_path), environ=pod_environment())


def dockerfile() -> str:
    return (REPO / "deploy" / "Dockerfile").read_text()


def probe_seconds(probe: dict[str, Any]) -> int:
    """How long a probe may fail before it acts (Kubernetes' defaults where unset)."""
    period: int = probe.get("periodSeconds", 10)
    failures: int = probe.get("failureThreshold", 3)
    return period * failures


# ---------------------------------------------------------------- the schema


def test_the_pinned_kubernetes_version_has_a_schema() -> None:
    minor = ".".join(KUBERNETES_VERSION.split(".")[:2])
    versions = kubernetes_validate.utils.all_versions()
    assert any(version.startswith(minor + ".") for version in versions), f"no schema for {minor}: {versions}"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: path.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    loaded = [document for document in yaml.safe_load_all(path.read_text()) if document is not None]
    assert loaded, f"{path.name} holds no resource"
    for document in loaded:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = "/".join(str(part) for part in error.path)
            pytest.fail(f"{path.name}: {document['kind']} {document['metadata']['name']}: {where}: {error.message}")


def test_strict_validation_refuses_what_kubernetes_would_not_take() -> None:
    # The check above can fail: a misspelt field and a wrong type each are refused.
    misspelt = json.loads(json.dumps(resource("Deployment")))
    misspelt["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    mistyped = json.loads(json.dumps(resource("Service", "deployd-headless")))
    mistyped["spec"]["ports"][0]["port"] = "fifty thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(mistyped, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBE / KUSTOMIZATION).read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    assert set(listed) == {path.name for path in manifest_files()}, (
        "kustomization.yaml's resources must be exactly the manifests in deploy/kubernetes/"
    )
    # Nothing that changes the resources beyond a namespace and an image (the files are what is checked).
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "namespace", "images"}, set(kustomization)
    names = [(document["kind"], document["metadata"]["name"]) for _, document in documents()]
    assert len(names) == len(set(names)), f"a resource is defined twice: {names}"


def test_kustomize_builds_every_resource() -> None:
    """`kubectl kustomize` (or kustomize) builds what `kubectl apply -k` would apply, where installed."""
    kubectl, kustomize = shutil.which("kubectl"), shutil.which("kustomize")
    if kubectl is None and kustomize is None:
        pytest.skip("neither kubectl nor kustomize is installed: the kustomization is checked as YAML only")
    command = [kubectl, "kustomize", str(KUBE)] if kubectl else [str(kustomize), "build", str(KUBE)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = sorted((item["kind"], item["metadata"]["name"]) for item in yaml.safe_load_all(result.stdout) if item)
    assert built == sorted((document["kind"], document["metadata"]["name"]) for _, document in documents())


# ---------------------------------------------------------------- the daemon's config


def test_configmap_config_loads_through_the_daemon_parser(tmp_path: Path) -> None:
    config = pod_config(tmp_path)  # an unknown key or a bad value raises ConfigError here
    assert split_address(config.server.address) == ("0.0.0.0", container_ports()["grpc"])
    assert split_address(config.metrics.address) == ("0.0.0.0", container_ports()["metrics"])
    assert split_address(config.server.http_address) == ("0.0.0.0", container_ports()["http"])
    assert [model.name for model in config.models] == ["seed"]
    assert config.models_on_error == "stop", "a pod whose models cannot load must not turn ready"
    written = yaml.safe_load(config_map()["data"][Path(config_path()).name])
    assert not written["auth"]["admin_tokens"] and not written["auth"]["invoke_tokens"], "no token in the ConfigMap"


def test_configmap_config_refuses_to_start_without_the_secret(tmp_path: Path) -> None:
    # 0.0.0.0 without a token: the daemon refuses, so the Secret is not optional.
    with pytest.raises(ConfigError, match="no auth tokens"):
        load_config(write_config(tmp_path), environ={"DEPLOYD_POOL_WORKERS": kubelet_cpu_value()})
    invoke = env_source("DEPLOYD_AUTH_INVOKE_TOKENS")["secretKeyRef"]
    admin = env_source("DEPLOYD_AUTH_ADMIN_TOKENS")["secretKeyRef"]
    assert invoke["name"] == admin["name"] == SECRET
    assert not invoke.get("optional", False), "without invoke tokens no client could call"
    # Colon-separated, like the daemon's other list overrides.
    config = load_config(write_config(tmp_path), environ=pod_environment(DEPLOYD_AUTH_INVOKE_TOKENS="one:two"))
    assert config.auth.invoke_tokens == ("one", "two")


def test_workers_follow_the_cpu_limit(tmp_path: Path) -> None:
    field = env_source("DEPLOYD_POOL_WORKERS")["resourceFieldRef"]
    assert field["resource"] == "limits.cpu"
    assert quantity(field.get("divisor", "1")) == 1
    assert field.get("containerName", CONTAINER) == CONTAINER
    resources_ = container()["resources"]
    assert quantity(resources_["requests"]["cpu"]) == quantity(resources_["limits"]["cpu"]), (
        "request the CPU limit: the HPA's utilization is relative to the request"
    )
    config = pod_config(tmp_path)
    assert config.pool.workers == config.worker_count == int(kubelet_cpu_value()) >= 1
    # A fractional limit: the kubelet rounds up, and the daemon takes the integer it gives.
    assert load_config(write_config(tmp_path), environ=pod_environment(DEPLOYD_POOL_WORKERS="2")).pool.workers == 2


def test_data_ports_line_up_with_the_workers(tmp_path: Path) -> None:
    """pool.data_ports gives worker slot i the port P + i: the pod declares exactly those, for the
    worker count the CPU limit gives, the headless Service names each, and Endpoints tells
    clients the pod's IP (the downward API), not the 0.0.0.0 the ports are bound to."""
    config = pod_config(tmp_path)
    first = config.pool.data_ports
    assert first > 0, "declared containerPorts need fixed data ports (pool.data_ports P, not 0 or -1)"
    wanted = {f"{DATA_PORT_PREFIX}{slot}": first + slot for slot in range(config.worker_count)}
    assert data_ports_declared(container_ports()) == wanted, (
        f"{config.worker_count} workers (limits.cpu) serve on {sorted(wanted.values())}: one containerPort each"
    )
    assert all(port["protocol"] == "TCP" for port in container()["ports"])
    ports = sorted(container_ports().values())
    assert len(ports) == len(set(ports)), f"a port is declared twice: {ports}"
    # Bound on every interface of the pod, like the daemon's own address.
    assert config.data_host == "0.0.0.0" == split_address(config.server.address)[0]
    # The headless Service lists every data port by its name.
    headless = resource("Service", "deployd-headless")
    listed = {port["name"]: (port["port"], port["targetPort"]) for port in headless["spec"]["ports"]}
    assert {name: listed.get(name) for name in wanted} == {name: (port, name) for name, port in wanted.items()}
    # Endpoints advertises the pod's IP: the kubelet's status.podIP, through the environment.
    source = env_source("DEPLOYD_SERVER_ADVERTISE_HOST")
    assert source == {"fieldRef": {"fieldPath": "status.podIP"}}, source
    assert config.server.advertise_host == POD_IP
    written = yaml.safe_load(config_map()["data"][Path(config_path()).name])
    assert not written["server"].get("advertise_host"), "the pod's IP comes from the environment, not the ConfigMap"
    # A CPU limit of 3 would need a third port: the check above is what fails then.
    three = load_config(write_config(tmp_path), environ=pod_environment(DEPLOYD_POOL_WORKERS="3"))
    assert len(data_ports_declared(container_ports())) != three.worker_count


def test_seed_model_init_container_exports_what_models_serves(tmp_path: Path) -> None:
    exporter = config_map()["data"]["export_seed.py"]
    assert exporter == (REPO / "scripts" / "export_seed.py").read_text(), (
        "the ConfigMap's export_seed.py must be a copy of scripts/export_seed.py"
    )
    [init] = pod_spec()["initContainers"]
    assert init["image"] == container()["image"]
    script, target = init["command"][-2:]
    config_dir = mount_at(str(Path(config_path()).parent), init)
    assert config_dir["name"] == "config" and script == f"{config_dir['mountPath']}/export_seed.py"
    config = pod_config(tmp_path)
    packages = mount_at(config.packages.directory, init)
    assert not packages.get("readOnly"), "the initContainer writes the packages"
    assert Path(target).parent == Path(config.packages.directory)
    assert Path(target).name in {model.package for model in config.models}


# ---------------------------------------------------------------- the manifests together


def test_services_and_budgets_select_the_pods() -> None:
    deployment = resource("Deployment")
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels().items()
    for service in resources("Service"):
        selector = service["spec"]["selector"]
        assert selector and selector.items() <= pod_labels().items(), f"{service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in container_ports(), f"{service['metadata']['name']}: no container port {target!r}"
            assert port["port"] == container_ports()[target]
    headless = resource("Service", "deployd-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses"), "only ready pods may be in DNS"
    names = ["grpc", "http", *data_ports_declared(container_ports())]
    assert [port["name"] for port in headless["spec"]["ports"]] == names
    budget = resource("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels().items()
    assert budget["spec"].get("maxUnavailable") == 1 or budget["spec"].get("minAvailable") == 1


def test_autoscaler_owns_the_replica_count() -> None:
    autoscaler = resource("HorizontalPodAutoscaler")
    deployment = resource("Deployment")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"], "with an HPA, replicas in the Deployment fight it on every apply"
    assert 2 <= autoscaler["spec"]["minReplicas"] < autoscaler["spec"]["maxReplicas"]
    [metric] = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container()["resources"]["requests"], "CPU utilization needs a CPU request"


def test_probes_ask_the_daemons_health_names() -> None:
    probes = {kind: container()[f"{kind}Probe"] for kind in ("startup", "liveness", "readiness")}
    for kind, probe in probes.items():
        assert set(probe) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}, f"{kind}: a native gRPC probe"
        assert probe["grpc"]["port"] == container_ports()["grpc"], f"{kind} probe: not the gRPC port"
    # Readiness: every worker serves; liveness and startup: the whole server (at least one worker).
    assert probes["readiness"]["grpc"]["service"] == Health(SERVICE_NAME).capacity_name
    assert probes["liveness"]["grpc"].get("service", "") in ("", SERVICE_NAME)
    assert probes["startup"]["grpc"].get("service", "") in ("", SERVICE_NAME)


def test_startup_probe_covers_the_workers_start(tmp_path: Path) -> None:
    config = pod_config(tmp_path)
    # A worker may take pool.start_timeout_seconds to greet; torch's import and the models come on top.
    assert probe_seconds(container()["startupProbe"]) >= 2 * config.pool.start_timeout_seconds


def test_grace_period_covers_the_shutdown(tmp_path: Path) -> None:
    config = pod_config(tmp_path)
    pre_stop = container().get("lifecycle", {}).get("preStop", {})
    pause = float(pre_stop["exec"]["command"][-1]) if pre_stop else 0.0
    if pre_stop:
        assert pre_stop["exec"]["command"][0] == "sleep", "the only preStop hook here is a pause"
    log_flush = inspect.signature(logs.stop).parameters["timeout"].default
    # SIGTERM: drain calls, then each worker gets stop_timeout to exit, then again after SIGTERM.
    shutdown = pause + config.server.shutdown_grace_seconds + 2 * config.pool.stop_timeout_seconds + log_flush
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace > shutdown, f"terminationGracePeriodSeconds {grace} must exceed the daemon's shutdown, {shutdown}s"


def test_shared_memory_is_memory_backed_and_budgeted(tmp_path: Path) -> None:
    shm = volume(mount_at("/dev/shm")["name"])
    assert shm["emptyDir"].get("medium") == "Memory", "/dev/shm must be a memory-backed emptyDir"
    assert "sizeLimit" in shm["emptyDir"], "bound /dev/shm: it counts against the memory limit"
    config = pod_config(tmp_path)
    assert config.worker.memory_limit_bytes > 0, "the daemon must replace a growing worker before the OOM killer"
    limits = container()["resources"]["limits"]
    needed = config.worker_count * config.worker.memory_limit_bytes + quantity(shm["emptyDir"]["sizeLimit"])
    assert quantity(limits["memory"]) >= needed + DAEMON_MEMORY_BYTES, (
        "the memory limit must hold every worker at worker.memory_limit_bytes, /dev/shm and the daemon"
    )
    assert quantity(container()["resources"]["requests"]["memory"]) == quantity(limits["memory"])


def test_pod_runs_unprivileged_on_a_read_only_root(tmp_path: Path) -> None:
    security = pod_spec()["securityContext"]
    uid = re.search(r"useradd .*--uid (\d+)", dockerfile())
    assert uid, "deploy/Dockerfile makes its user with useradd --uid"
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == int(uid.group(1)), "the image's user"
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod_spec()["automountServiceAccountToken"] is False
    assert pod_spec()["enableServiceLinks"] is False, "Service variables share the DEPLOYD_ prefix"
    for item in [*pod_spec()["initContainers"], *pod_spec()["containers"]]:
        context = item["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, item["name"]
        assert context["readOnlyRootFilesystem"] is True, item["name"]
        assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"], item["name"]
        assert context.get("runAsUser", security["runAsUser"]) != 0 and context.get("privileged") is not True
        # What it writes: temporary files (the package store, the fork server's socket).
        assert not mount_at("/tmp", item).get("readOnly"), f"{item['name']}: /tmp must be writable"
    assert not mount_at("/dev/shm").get("readOnly")
    for mount in container()["volumeMounts"]:
        assert "emptyDir" in volume(mount["name"]) or mount.get("readOnly"), f"{mount['mountPath']}: read-only"
    config = pod_config(tmp_path)
    assert config.packages.store_directory in ("", "/tmp") or config.packages.store_directory.startswith("/tmp/")
    assert mount_at(config.packages.directory)["name"] == "packages"


def test_config_is_mounted_where_the_image_reads_it() -> None:
    cmd = re.findall(r"^CMD (\[.*\])$", dockerfile(), re.MULTILINE)
    assert cmd, "deploy/Dockerfile needs an exec-form CMD"
    assert container()["args"] == json.loads(cmd[-1]), "the image's own arguments, spelt out"
    assert "command" not in container(), "keep the image's entrypoint: tini passes signals on"
    mount = mount_at(str(Path(config_path()).parent))
    assert mount["name"] == "config" and mount.get("readOnly")
    assert "subPath" not in mount, "a subPath mount never sees the ConfigMap's updates"
    assert container()["image"] == "deployd:latest"


def test_prometheus_scrapes_the_metrics_port(tmp_path: Path) -> None:
    annotations = resource("Deployment")["spec"]["template"]["metadata"]["annotations"]
    port = split_address(pod_config(tmp_path).metrics.address)[1]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port) == str(container_ports()["metrics"])
    assert annotations["prometheus.io/path"] == "/metrics"
    assert not resources("ServiceMonitor")


# ---------------------------------------------------------------- the pod's commands, run here


def health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    status: int = response.status
    return status


def seed_input() -> pb.Value:
    x = torch.arange(100, dtype=torch.float32).reshape(1, 1, 10, 10) / 100
    return pb.Value(tensor_value=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(x.shape), data=x.numpy().tobytes()))


def check_data_ports(target: str, workers: int) -> None:
    """A client in the cluster with the invoke token: Endpoints names a port per worker at the
    advertised host, and the seed model answers there as through the daemon; the Python client
    takes them too (it would warn if it could not)."""
    metadata = (("authorization", "Bearer invoke-token"),)
    request = pb.InvokeRequest(object_id="seed", args=[seed_input()])
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DeploydStub(channel)
        answer = stub.Endpoints(pb.EndpointsRequest(), timeout=30, metadata=metadata)
        by_daemon = stub.Invoke(request, timeout=60, metadata=metadata).result
        assert len(answer.workers) == workers, answer
        assert all(worker.address.startswith("127.0.0.1:") for worker in answer.workers), answer
        assert all("seed" in worker.models for worker in answer.workers), answer
        for worker in answer.workers:
            with grpc.insecure_channel(worker.address) as direct:
                result = pb_grpc.DeploydStub(direct).Invoke(request, timeout=60, metadata=metadata).result
            assert result == by_daemon, f"{worker.address} answered otherwise than the daemon"
        with InterpreterManager(target, token="invoke-token", timeout=60) as manager:
            seed = manager.model("seed")
            x = torch.frombuffer(bytearray(seed_input().tensor_value.data), dtype=torch.float32).reshape(1, 1, 10, 10)
            expected = torch.frombuffer(bytearray(by_daemon.tensor_value.data), dtype=torch.float32)
            for _ in range(2 * workers):
                assert torch.equal(seed(x).flatten(), expected)


def test_pod_commands_serve_the_seed_model_and_stop_within_the_grace_period(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The initContainer's export, then the daemon as the pod runs it: the ConfigMap's config
    and the Deployment's environment, with addresses on loopback and the packages in tmp_path."""
    packages = tmp_path / "packages"
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    config = load_config(write_config(config_dir), environ=pod_environment())
    [init] = pod_spec()["initContainers"]
    script, target = init["command"][-2:]
    (config_dir / Path(script).name).write_text(config_map()["data"][Path(script).name])
    package = packages / Path(target).relative_to(config.packages.directory)
    subprocess.run([sys.executable, str(config_dir / Path(script).name), str(package)], check=True, timeout=120)
    assert package.is_file()

    # Loopback here: the data ports on any free ports of 127.0.0.1, which stands in for the pod's IP.
    env = pod_environment(
        DEPLOYD_PACKAGES_DIRECTORY=str(packages),
        DEPLOYD_METRICS_ADDRESS="127.0.0.1:0",
        DEPLOYD_POOL_DATA_PORTS="0",
        DEPLOYD_POOL_DATA_HOST="127.0.0.1",
        DEPLOYD_SERVER_ADVERTISE_HOST="127.0.0.1",
    )
    daemon = DaemonProcess(config_dir / Path(config_path()).name, env=env)
    daemon.env = {key: value for key, value in daemon.env.items() if not key.startswith("DEPLOYD_")} | env
    daemon.start()
    try:
        serving = health_pb2.HealthCheckResponse.SERVING
        for kind in ("startup", "liveness", "readiness"):
            service = container()[f"{kind}Probe"]["grpc"].get("service", "")
            assert health(daemon.target, service) == serving, f"{kind} probe ({service!r}) on a serving pod"
        assert health(daemon.target, "seed") == serving, daemon.log
        assert f"starting {kubelet_cpu_value()} workers" in daemon.log
        check_data_ports(daemon.target, workers=int(kubelet_cpu_value()))
        assert not [record for record in caplog.records if "cannot be reached" in record.getMessage()]
    finally:
        started = time.monotonic()
        daemon.assert_clean_stop()
    pause = float(container()["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert time.monotonic() - started + pause < pod_spec()["terminationGracePeriodSeconds"]
