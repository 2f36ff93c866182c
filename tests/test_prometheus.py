"""A real Prometheus (Debian's `prometheus`) scrapes a real daemon's /metrics."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml

from client import InterpreterManager
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, wait_until
from tests.test_deploy import DASHBOARD_METRICS, dashboard_queries, prometheus_query
from tests.tools import free_port, require_program


@pytest.fixture(scope="module")
def metrics_daemon(package_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    config = tmp_path_factory.mktemp("metrics") / "config.yaml"
    process = DaemonProcess(
        write_config(config, package_dir, pool={"workers": 1}, metrics={"address": "127.0.0.1:0"})
    ).start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


def metrics_port(daemon: DaemonProcess) -> int:
    match = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", daemon.log)
    assert match, f"no metrics address in the log:\n{daemon.log}"
    return int(match.group(1))


# Straight to 127.0.0.1, whatever http_proxy says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url: str) -> dict[str, object]:
    with _OPENER.open(url, timeout=5) as response:
        body: dict[str, object] = json.load(response)
        return body


class Scrape(NamedTuple):
    daemon: DaemonProcess
    prometheus: str  # its base URL
    package_dir: Path


@pytest.fixture
def scrape(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scrape]:
    """A Prometheus scraping metrics_daemon every second."""
    binary = require_program("prometheus")  # before starting the daemon, so a skip costs nothing
    metrics_daemon: DaemonProcess = request.getfixturevalue("metrics_daemon")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "deployd", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port(metrics_daemon)}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={address}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> bool:
            assert process.poll() is None, f"prometheus exited with {process.returncode}:\n{log_path.read_text()}"
            try:
                with _OPENER.open(f"http://{address}/-/ready", timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        assert wait_until(ready, 30, interval=0.2), f"prometheus not ready in 30s:\n{log_path.read_text()}"
        yield Scrape(metrics_daemon, f"http://{address}", request.getfixturevalue("package_dir"))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def query(base: str, expr: str) -> list[dict[str, object]]:
    body = get_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert body["status"] == "success", body
    data = body["data"]
    assert isinstance(data, dict)
    result: list[dict[str, object]] = data["result"]
    return result


def test_prometheus_scrapes_calls(scrape: Scrape) -> None:
    daemon, prometheus, package_dir = scrape
    with InterpreterManager(daemon.target, timeout=60) as manager:
        scale = manager.load_package(package_dir / "models.pt").load_pickle("models", "scale.pkl")
        assert torch.equal(scale(torch.ones(1)), torch.full((1,), 2.0))

    def invoked() -> float:
        result = query(prometheus, 'sum(deployd_calls_total{method="Invoke"})')
        return float(result[0]["value"][1]) if result else 0.0  # type: ignore[index]

    deadline = time.monotonic() + 60
    while invoked() < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert invoked() >= 1, "Prometheus never saw the Invoke call"
    [target] = get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]  # type: ignore[index]
    assert target["health"] == "up", target
    # Every query on the dashboard runs on this Prometheus.
    for expr in dashboard_queries():
        query(prometheus, prometheus_query(expr))


def test_daemon_exports_every_dashboard_metric(metrics_daemon: DaemonProcess) -> None:
    with _OPENER.open(f"http://127.0.0.1:{metrics_port(metrics_daemon)}/metrics", timeout=5) as response:
        text = response.read().decode()
    # "# TYPE name kind" names each family even before it has a sample (counters with their _total).
    exported = set(re.findall(r"^# TYPE (deployd_\w+) ", text, re.MULTILINE))
    missing = ", ".join(sorted(DASHBOARD_METRICS - exported))
    assert not missing, f"the dashboard shows metrics the daemon does not export: {missing}"
