"""Prometheus metrics, kept in the daemon process only and served at /metrics.

Names follow deployd_<noun>_<unit>. Observed where calls enter and leave the daemon
(the servicer) and where the pool's capacity changes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server import logs
from server.pool.procinfo import MemoryUsage

log = logging.getLogger(__name__)

# From a fast identity call (~1 ms) to a slow model (tens of seconds).
_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The parts of a call: process hops of tens of microseconds up to models of a minute.
_FINE_BUCKETS = (
    *(us / 1e6 for us in (10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 125, 150, 200, 300, 500)),
    *_DURATION_BUCKETS[1:],
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            "deployd_calls",
            "gRPC calls handled, by method, model (a model's name, or an object's id) and status code",
            ["method", "model", "code"],
            registry=r,
        )
        self.call_duration = Histogram(
            "deployd_call_duration_seconds",
            "Time from a call's arrival to its answer, by method",
            ["method"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "deployd_queue_wait_seconds", "Time a call waited for a free worker", buckets=_FINE_BUCKETS, registry=r
        )
        self.run = Histogram(
            "deployd_run_seconds",
            "Time a worker spent on an Invoke, from taking it to its reply reaching the daemon, by model"
            " (a model's name, or an object's id)",
            ["model"],
            buckets=_FINE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "deployd_batch_size",
            "Rows (dim 0) of each batch a model with batching on ran, by model",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.batch_queue_delay = Histogram(
            "deployd_batch_queue_delay_seconds",
            "Time a call waited in its model's batcher before its batch was sent, by model",
            ["model"],
            buckets=_FINE_BUCKETS,
            registry=r,
        )
        self._batched: set[str] = set()  # models with batch series
        self.worker_call = Histogram(
            "deployd_worker_call_seconds",
            "Where a call to a worker spends its time: to_worker (the daemon writes -> the worker has read),"
            " in_worker (read -> the worker writes its reply), to_daemon (written -> the daemon has read)",
            ["phase"],
            buckets=_FINE_BUCKETS,
            registry=r,
        )
        self._phases = tuple(self.worker_call.labels(phase) for phase in ("to_worker", "in_worker", "to_daemon"))
        self.calls_in_flight = Gauge("deployd_calls_in_flight", "gRPC calls being handled now", registry=r)
        self.queue_depth = Gauge("deployd_queue_depth", "Calls waiting for a free worker now", registry=r)
        self.workers_serving = Gauge("deployd_workers_serving", "Worker processes ready to take calls", registry=r)
        self.workers_busy = Gauge("deployd_workers_busy", "Worker processes running a call now", registry=r)
        self.worker_restarts = Counter(
            "deployd_worker_restarts",
            "Workers replaced, by why the old one ended: exited, crashed (its own fault signal), killed"
            " (from outside), memory_limit, abandoned_call (hung past its caller), call_timeout, replay_timeout",
            ["reason"],
            registry=r,
        )
        self.packages_loaded = Gauge("deployd_packages_loaded", "Packages loaded now", registry=r)
        self.objects_loaded = Gauge("deployd_objects_loaded", "Objects loaded now", registry=r)
        self.sessions_open = Gauge("deployd_sessions_open", "Sessions (acquire_one) open now", registry=r)
        self.load_duration = Histogram(
            "deployd_load_duration_seconds",
            "Time to load a package or unpickle an object on every worker, by kind (package, pickle)",
            ["kind"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.message_bytes = Counter(
            "deployd_message_bytes",
            "Bytes of gRPC messages, by direction (received, sent)",
            ["direction"],
            registry=r,
        )
        self._received, self._sent = self.message_bytes.labels("received"), self.message_bytes.labels("sent")
        r.register(_LogDropsCollector(logs.records_dropped))
        self._http: Any = None
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._runs: dict[str, Any] = {}

    def watch(
        self,
        queue_depth: Callable[[], int],
        workers_busy: Callable[[], int],
        packages: Callable[[], int],
        objects: Callable[[], int],
        worker_memory: Callable[[], list[tuple[int, MemoryUsage]]],
        sessions: Callable[[], int] = lambda: 0,
    ) -> None:
        """Gauges read from the daemon's state when scraped, not kept up to date on every change."""
        self.sessions_open.set_function(sessions)
        self.queue_depth.set_function(queue_depth)
        self.workers_busy.set_function(workers_busy)
        self.packages_loaded.set_function(packages)
        self.objects_loaded.set_function(objects)
        self.registry.register(_WorkerMemoryCollector(worker_memory))

    def observe_call(self, method: str, object_id: str, code: str, seconds: float) -> None:
        # labels() takes a lock and builds a key on every call; the children never change.
        key = (method, object_id, code)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.calls.labels(method, object_id, code),
                self.call_duration.labels(method),
            )
        children[0].inc()
        children[1].observe(seconds)

    def observe_received(self, size: int) -> None:
        self._received.inc(size)

    def observe_sent(self, size: int) -> None:
        self._sent.inc(size)

    def observe_run(self, object_id: str, seconds: float) -> None:
        child = self._runs.get(object_id)
        if child is None:
            child = self._runs[object_id] = self.run.labels(object_id)
        child.observe(seconds)

    def observe_batch(self, model: str, rows: int) -> None:
        self._batched.add(model)
        self.batch_size.labels(model).observe(rows)

    def observe_batch_wait(self, model: str, seconds: float) -> None:
        self._batched.add(model)
        self.batch_queue_delay.labels(model).observe(seconds)

    def forget_object(self, object_id: str) -> None:
        """Drop an unloaded object's series, so that loads and unloads do not grow /metrics forever."""
        if object_id in self._batched:
            self._batched.discard(object_id)
            for histogram in (self.batch_size, self.batch_queue_delay):
                with contextlib.suppress(KeyError):
                    histogram.remove(object_id)
        for key in [key for key in self._children if key[1] == object_id]:
            del self._children[key]
            self.calls.remove(*key)
        if self._runs.pop(object_id, None) is not None:
            self.run.remove(object_id)

    def observe_worker_call(self, timing: tuple[float, float, float]) -> None:
        for phase, seconds in zip(self._phases, timing, strict=True):
            phase.observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (port 0: any free port); returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        bound: int = self._http.server_port
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


class _WorkerMemoryCollector(Collector):
    """deployd_worker_memory_bytes{worker, kind}, read from /proc when scraped."""

    def __init__(self, source: Callable[[], list[tuple[int, MemoryUsage]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "deployd_worker_memory_bytes",
            "Each worker's memory by kind: rss, pss (shared pages divided among the processes that map them),"
            " shared (e.g. weights), private",
            labels=["worker", "kind"],
        )
        for index, usage in self._source():
            for kind, value in zip(("rss", "pss", "shared", "private"), usage, strict=True):
                family.add_metric([str(index), kind], value)
        yield family


class _LogDropsCollector(Collector):
    """deployd_log_records_dropped_total, read from the log writer's count (server/logs.py) when scraped."""

    def __init__(self, source: Callable[[], int]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "deployd_log_records_dropped",
            "Log records dropped because stderr did not take them fast enough (the log queue was full)",
            value=self._source(),
        )
