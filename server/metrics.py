"""Prometheus metrics, kept in the daemon process only and served at /metrics.

Names follow deployd_<noun>_<unit>. Observed where calls enter and leave the daemon
(the servicer) and where the pool's capacity changes.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from server.config import split_address

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
        self.calls = Counter(
            "deployd_calls", "gRPC calls handled, by method and status code", ["method", "code"], registry=self.registry
        )
        self.call_duration = Histogram(
            "deployd_call_duration_seconds",
            "Time from a call's arrival to its answer, by method",
            ["method"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.worker_call = Histogram(
            "deployd_worker_call_seconds",
            "Where a call to a worker spends its time: to_worker (the daemon writes -> the worker has read),"
            " in_worker (read -> the worker writes its reply), to_daemon (written -> the daemon has read)",
            ["phase"],
            buckets=_FINE_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "deployd_queue_wait_seconds",
            "Time a call waited for a free worker",
            buckets=_FINE_BUCKETS,
            registry=self.registry,
        )
        self._phases = tuple(self.worker_call.labels(phase) for phase in ("to_worker", "in_worker", "to_daemon"))
        self.workers_serving = Gauge(
            "deployd_workers_serving", "Worker processes ready to take calls", registry=self.registry
        )
        self._http: Any = None
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        # labels() takes a lock and builds a key on every call; the children never change.
        key = (method, code)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.calls.labels(method, code), self.call_duration.labels(method))
        children[0].inc()
        children[1].observe(seconds)

    def observe_worker_call(self, timing: tuple[float, float, float]) -> None:
        for phase, seconds in zip(self._phases, timing, strict=True):
            phase.observe(seconds)

    def serve(self, address: str) -> int:
        """Serve /metrics on address (port 0: any free port); returns the bound port."""
        host, port = split_address(address)
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        bound: int = self._http.server_port
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
