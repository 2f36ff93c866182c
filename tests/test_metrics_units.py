"""The workers' call series on the daemon's /metrics (server.api.metrics), without a daemon:
worker processes write through Metrics(directory), a daemon-side Metrics adds them up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.api.metrics import Metrics
from tests.daemon_process import REPO

WORKER = """
import os, sys
from server.api.metrics import Metrics
metrics = Metrics(sys.argv[1])
for model, code, seconds in [("a", "OK", 0.002), ("a", "OK", 0.3), ("gone", "OK", 0.002), ("", "NOT_FOUND", 0.001)]:
    metrics.calls_in_flight.inc()
    metrics.observe_call("Invoke", model, code, seconds)
    metrics.calls_in_flight.dec()
metrics.observe_received(100)
metrics.observe_batch("a", 4)
metrics.calls_in_flight.inc()  # still in flight when the process ends
print(os.getpid())
"""


@pytest.fixture
def daemon_metrics() -> Iterator[tuple[Metrics, Path]]:
    metrics = Metrics()
    directory = metrics.share_with_workers(None)
    metrics.watch(lambda: 0, lambda: 0, lambda: 0, lambda: 0, lambda: [], models=lambda: {"a"})
    try:
        yield metrics, Path(directory)
    finally:
        metrics.close()


def run_worker(directory: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WORKER), directory], cwd=REPO, capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_workers_series_add_to_the_daemons(daemon_metrics: tuple[Metrics, Path]) -> None:
    metrics, directory = daemon_metrics
    assert (directory.stat().st_mode & 0o777) == 0o700
    pids = [run_worker(str(directory)) for _ in range(2)]
    metrics.observe_call("Invoke", "a", "OK", 0.001)
    metrics.calls_in_flight.inc()

    def check(in_flight: float) -> None:
        assert (
            value(metrics, "deployd_calls_total", method="Invoke", model="a", code="OK", protocol="grpc") == 2 * 2 + 1
        )
        assert value(metrics, "deployd_calls_total", method="Invoke", model="", code="NOT_FOUND", protocol="grpc") == 2
        assert value(metrics, "deployd_calls_total", method="Invoke", model="gone", code="OK", protocol="grpc") is None
        assert value(metrics, "deployd_call_duration_seconds_count", method="Invoke", protocol="grpc") == 2 * 4 + 1
        assert (
            value(metrics, "deployd_call_duration_seconds_bucket", method="Invoke", protocol="grpc", le="0.25")
            == 2 * 3 + 1
        )
        assert (
            value(metrics, "deployd_call_duration_seconds_bucket", method="Invoke", protocol="grpc", le="+Inf")
            == 2 * 4 + 1
        )
        assert value(metrics, "deployd_message_bytes_total", direction="received", protocol="grpc") == 200
        assert value(metrics, "deployd_batch_size_count", model="a") == 2
        assert value(metrics, "deployd_calls_in_flight") == in_flight
        # The daemon's own series are its own: no worker wrote them.
        assert value(metrics, "deployd_queue_wait_seconds_count") == 0
        text = generate_latest(metrics.registry).decode()
        names = [family.name for family in text_string_to_metric_families(text)]
        assert len(names) == len(set(names)), "one family per name"

    check(in_flight=1 + 2)
    assert sorted(os.listdir(directory)) == sorted(
        f"{kind}_{pid}.db" for pid in pids for kind in ("counter", "histogram", "gauge_livesum")
    )
    # Dead workers: their counts stay, their calls in flight go, their files are folded.
    metrics.on_worker_exit(pids[0])
    check(in_flight=1 + 1)
    metrics.on_worker_exit(pids[1])
    check(in_flight=1)
    assert sorted(os.listdir(directory)) == ["counter_archive.db", "histogram_archive.db"]
    # Ten more come and go: still two files, counts still add up.
    for _ in range(10):
        metrics.on_worker_exit(run_worker(str(directory)))
    assert sorted(os.listdir(directory)) == ["counter_archive.db", "histogram_archive.db"]
    assert value(metrics, "deployd_calls_total", method="Invoke", model="a", code="OK", protocol="grpc") == 12 * 2 + 1


def test_close_removes_the_directory() -> None:
    metrics = Metrics()
    directory = metrics.share_with_workers(None)
    run_worker(directory)
    metrics.close()
    assert not os.path.exists(directory)
