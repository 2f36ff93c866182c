"""Prometheus metrics, served at the daemon's /metrics.

Names follow deployd_<noun>_<unit>. Observed where calls enter and leave the daemon
(the servicer) and where the pool's capacity changes.

With data ports (pool.data_ports), workers answer calls the daemon never sees. Each worker's
handlers observe the same call series into a Metrics of its own, in prometheus_client's
multiprocess mode: every value is a slot in a file of that process's, in a directory private to
this daemon. The daemon keeps its own series in memory (no file write on its calls) and, when
scraped, adds what the workers' files hold (MultiProcessCollector) series by series:

    worker ──observe──> counter_<pid>.db, histogram_<pid>.db, gauge_livesum_<pid>.db ─┐
    daemon ──observe──> its registry ──────────────────────────────────────────────────┴─> /metrics
    worker exits ──> its live gauges go (mark_process_dead); its counters and histograms are
                     folded into counter_archive.db, histogram_archive.db (totals never drop,
                     and files do not pile up with replacements)
"""

from __future__ import annotations

import bisect
import contextlib
import glob
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from server import logs
from server.pool.gpustats import GpuUsage
from server.pool.procinfo import MemoryUsage

log = logging.getLogger(__name__)

# The protocols a call came by (the protocol label of the call series).
GRPC = "grpc"
HTTP = "http"

# From a fast identity call (~1 ms) to a slow model (tens of seconds).
_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The parts of a call: process hops of tens of microseconds up to models of a minute.
_FINE_BUCKETS = (
    *(us / 1e6 for us in (10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 125, 150, 200, 300, 500)),
    *_DURATION_BUCKETS[1:],
)


class Metrics:
    def __init__(self, directory: str = "") -> None:
        """directory: in a worker, where its call series go for the daemon's /metrics
        (_write_to_directory); "": they stay in this process's memory, as all the others do."""
        self.registry = CollectorRegistry()
        r = self.registry
        # The daemon's own series: in memory, made before the switch to files in a worker.
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
        self.worker_call = Histogram(
            "deployd_worker_call_seconds",
            "Where a call to a worker spends its time: to_worker (the daemon writes -> the worker has read),"
            " in_worker (read -> the worker writes its reply), to_daemon (written -> the daemon has read)",
            ["phase"],
            buckets=_FINE_BUCKETS,
            registry=r,
        )
        self._phases = tuple(self.worker_call.labels(phase) for phase in ("to_worker", "in_worker", "to_daemon"))
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
        self.worker_output_dropped = Counter(
            "deployd_worker_output_dropped_bytes",
            "Bytes a worker printed (its stdout and stderr) that were dropped, not logged: past the"
            " lines a second the log takes from one worker",
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
        self.warmup_duration = Histogram(
            "deployd_warmup_duration_seconds",
            "Time a model's warmup (its entry's warmup:) took in one worker: at load, and in a replacement",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        if directory:
            _write_to_directory(directory)
        # The series a worker's data port observes too: kept apart, for the workers' files to be added.
        shared = CollectorRegistry()
        self.calls = Counter(
            "deployd_calls",
            "Calls handled, by method, model (a model's name, or an object's id), status code (gRPC's"
            " names, for HTTP calls too) and protocol (grpc, http)",
            ["method", "model", "code", "protocol"],
            registry=shared,
        )
        self.call_duration = Histogram(
            "deployd_call_duration_seconds",
            "Time from a call's arrival to its answer, by method and protocol (grpc, http)",
            ["method", "protocol"],
            buckets=_DURATION_BUCKETS,
            registry=shared,
        )
        # livesum: in a worker's file, counted while that worker lives.
        self.calls_in_flight = Gauge(
            "deployd_calls_in_flight", "gRPC calls being handled now", multiprocess_mode="livesum", registry=shared
        )
        self._add_in_flight = _adder(self.calls_in_flight)
        self.message_bytes = Counter(
            "deployd_message_bytes",
            "Bytes of gRPC messages and HTTP bodies, by direction (received, sent) and protocol (grpc, http)",
            ["direction", "protocol"],
            registry=shared,
        )
        self._received, self._sent = (
            self.message_bytes.labels("received", GRPC),
            self.message_bytes.labels("sent", GRPC),
        )
        self._http_received = self.message_bytes.labels("received", HTTP)
        self._add_received, self._add_sent = _adder(self._received), _adder(self._sent)
        self._http_sent = self.message_bytes.labels("sent", HTTP)
        self.batch_size = Histogram(
            "deployd_batch_size",
            "Rows (dim 0) of each batch a model with batching on ran, by model",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=shared,
        )
        self.batch_queue_delay = Histogram(
            "deployd_batch_queue_delay_seconds",
            "Time a call waited in its model's batcher before its batch was sent, by model",
            ["model"],
            buckets=_FINE_BUCKETS,
            registry=shared,
        )
        self._batched: set[str] = set()  # models with batch series
        self._with_workers = _WithWorkers(shared)
        r.register(self._with_workers)
        r.register(_LogDropsCollector(logs.records_dropped))
        self._http: Any = None
        # (method, model, code, protocol) -> how a call adds to its count and its duration
        self._children: dict[tuple[str, str, str, str], tuple[Callable[[float], None], Callable[[float], None]]] = {}
        self._runs: dict[str, Any] = {}

    def watch(
        self,
        queue_depth: Callable[[], int],
        workers_busy: Callable[[], int],
        packages: Callable[[], int],
        objects: Callable[[], int],
        worker_memory: Callable[[], list[tuple[int, MemoryUsage]]],
        sessions: Callable[[], int] = lambda: 0,
        models: Callable[[], Collection[str]] | None = None,
        gpu_usage: Callable[[], list[tuple[int, int, GpuUsage]]] = list,
    ) -> None:
        """Gauges read from the daemon's state when scraped, not kept up to date on every change.
        models: the names and object ids loaded now; the workers' series of others are not shown
        (a worker cannot forget a series, see forget_object)."""
        self._with_workers.models = models
        self.sessions_open.set_function(sessions)
        self.queue_depth.set_function(queue_depth)
        self.workers_busy.set_function(workers_busy)
        self.packages_loaded.set_function(packages)
        self.objects_loaded.set_function(objects)
        self.registry.register(_WorkerMemoryCollector(worker_memory))
        self.registry.register(_WorkerGpuCollector(gpu_usage))

    def observe_call(self, method: str, object_id: str, code: str, seconds: float, protocol: str = GRPC) -> None:
        # labels() takes a lock and builds a key on every call; the children never change.
        key = (method, object_id, code, protocol)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                _adder(self.calls.labels(method, object_id, code, protocol)),
                _observer(self.call_duration.labels(method, protocol)),
            )
        children[0](1)
        children[1](seconds)

    def call_started(self) -> None:
        """A gRPC call is being handled (calls_in_flight), until call_ended."""
        self._add_in_flight(1)

    def call_ended(self) -> None:
        self._add_in_flight(-1)

    def observe_received(self, size: int) -> None:
        self._add_received(size)

    def observe_sent(self, size: int) -> None:
        self._add_sent(size)

    def observe_http_bytes(self, received: int, sent: int) -> None:
        self._http_received.inc(received)
        self._http_sent.inc(sent)

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

    def share_with_workers(self, worker_group: int | None) -> str:
        """Have the workers' call series added to this registry's: a directory of this daemon's
        for their files (mode 0700; 0770 with worker_group, for workers of another user), which
        each worker is given (Metrics(directory)). Removed by close()."""
        directory = tempfile.mkdtemp(prefix=f"deployd-metrics-{os.getpid()}-")
        if worker_group is not None:
            os.chown(directory, -1, worker_group)
            os.chmod(directory, 0o770)
        self._with_workers.directory = directory
        return directory

    def on_worker_exit(self, pid: int) -> None:
        """A worker's process ended: its calls in flight stop counting, its totals stay."""
        if not self._with_workers.directory:
            return
        try:
            self._with_workers.fold(pid)
        except Exception:  # metrics must never stop what else follows a worker's death
            log.exception("metrics: cannot fold the files of worker pid %d", pid)

    def forget_object(self, object_id: str) -> None:
        """Drop an unloaded object's series, so that loads and unloads do not grow /metrics forever.
        The workers' series of it are hidden instead (watch's models), and dropped as their workers end."""
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
        if self._with_workers.directory:
            shutil.rmtree(self._with_workers.directory, ignore_errors=True)


# Every call adds to six values (calls in flight, up and down; its count; its duration's sum and
# bucket; the bytes of its request and its answer). prometheus_client checks on each inc or
# observe that the metric is not a parent with labels and that a counter's amount is not
# negative: 6 us a call of a data port's ~40 us of Python. These series' children are made
# here and their amounts are never negative, so the calls go to the values themselves.


def _adder(child: Any) -> Callable[[float], None]:
    """child.inc (a counter's or gauge's, labels given), without those checks: its value's own inc."""
    value = getattr(child, "_value", None)
    add = getattr(value, "inc", None)
    return add if callable(add) else child.inc  # type: ignore[no-any-return]


def _observer(child: Any) -> Callable[[float], None]:
    """child.observe (a histogram's, labels given), without those checks: the sum's value and the
    first bucket whose bound is at least the amount, as prometheus_client does."""
    total, buckets, bounds = (getattr(child, name, None) for name in ("_sum", "_buckets", "_upper_bounds"))
    if total is None or not buckets or not bounds or len(buckets) != len(bounds) or bounds[-1] != math.inf:
        return child.observe  # type: ignore[no-any-return]
    add_to_sum = total.inc
    add_to_bucket = [bucket.inc for bucket in buckets]
    bounds = list(bounds)

    def observe(amount: float) -> None:
        add_to_sum(amount)
        add_to_bucket[bisect.bisect_left(bounds, amount)](1)

    return observe


def _write_to_directory(directory: str) -> None:
    """In a worker: every metric value made from now on in this process is kept in files of this
    process's in directory (prometheus_client's multiprocess mode), for the daemon to add to its
    own. prometheus_client picks the mode when it is imported, from PROMETHEUS_MULTIPROC_DIR; the
    worker imported it already (it was forked before it was given the directory), so the mode is
    set here as well as the variable (which says where the files go)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()


class _WithWorkers(Collector):
    """The series a worker's data port observes too (calls, durations, bytes, calls in flight,
    batches): the daemon's own, plus what the workers' files hold (prometheus_client's
    MultiProcessCollector), summed series by series, so that a call counts the same whichever
    path it came by. Labels stay as they are: a series is the same series on both paths."""

    def __init__(self, own: CollectorRegistry) -> None:
        self._own = own
        self.directory = ""  # the workers' files; "": none
        self.models: Callable[[], Collection[str]] | None = None
        # A scrape never reads a dead worker's files while they are being folded.
        self._files = threading.Lock()
        self._names = frozenset(family.name for family in own.collect())  # its families, made before it

    def describe(self) -> Iterable[Metric]:
        return self._own.collect()

    def collect(self) -> Iterator[Metric]:
        own = list(self._own.collect())
        if not self.directory:
            yield from own
            return
        with self._files:
            theirs = {family.name: family for family in MultiProcessCollector.merge(self._files_now())}
        models = self.models() if self.models is not None else None
        for family in own:
            workers = theirs.get(family.name)
            if workers is not None:
                _add_samples(family, [sample for sample in workers.samples if _shown(sample, models)])
            yield family

    def fold(self, pid: int) -> None:
        """A dead worker's files: its live gauges removed (mark_process_dead), its counters and
        histograms added to one archive file per type (series of models gone left out), the rest
        removed. prometheus_client keeps a dead process's counts in its own files by default; one
        archive instead keeps the directory as large as the pool, however often workers are replaced."""
        directory = self.directory
        models = self.models() if self.models is not None else None
        with self._files:
            mark_process_dead(pid, directory)
            dead = glob.glob(os.path.join(directory, f"*_{pid}.db"))
            for kind in ("counter", "histogram"):
                files = [path for path in dead if os.path.basename(path).startswith(f"{kind}_")]
                if not files:
                    continue
                archive = os.path.join(directory, f"{kind}_archive.db")
                if os.path.exists(archive):
                    files.append(archive)
                # Not yet read (no .db) until it replaces the archive whole.
                partial = os.path.join(directory, f"{kind}_archive.partial")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(partial)
                out = MmapedDict(partial)
                try:
                    for family in MultiProcessCollector.merge(files, accumulate=False):
                        if family.name not in self._names:
                            continue  # a series of the daemon's alone, or model code's own metrics
                        for sample in family.samples:
                            if _shown(sample, models):
                                labels = sample.labels
                                key = mmap_key(
                                    family.name, sample.name, list(labels), list(labels.values()), family.documentation
                                )
                                out.write_value(key, sample.value, 0.0)
                finally:
                    out.close()
                os.replace(partial, archive)
            for path in dead:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)

    def _files_now(self) -> list[str]:
        return glob.glob(os.path.join(self.directory, "*.db"))


def _shown(sample: Sample, models: Collection[str] | None) -> bool:
    """Not a series of a model that is not loaded (None: every model is)."""
    model = sample.labels.get("model", "")
    return not model or models is None or model in models


def _add_samples(family: Metric, samples: list[Sample]) -> None:
    """Add samples to family's: to the sample of the same name and labels, else as a new one."""
    index = {(sample.name, tuple(sorted(sample.labels.items()))): i for i, sample in enumerate(family.samples)}
    new = []
    for sample in samples:
        i = index.get((sample.name, tuple(sorted(sample.labels.items()))))
        if i is None:
            new.append(sample)
        else:
            mine = family.samples[i]
            family.samples[i] = mine._replace(value=mine.value + sample.value)
    family.samples.extend(sorted(new, key=_exposition_order))


def _exposition_order(sample: Sample) -> tuple[tuple[tuple[str, str], ...], int, float]:
    """A series' samples as prometheus_client writes its own: buckets by le, then _count, _sum."""
    labels = tuple(sorted((name, value) for name, value in sample.labels.items() if name != "le"))
    rank = 1 if sample.name.endswith("_count") else 2 if sample.name.endswith("_sum") else 0
    return labels, rank, float(sample.labels.get("le", "0"))


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


class _WorkerGpuCollector(Collector):
    """deployd_worker_gpu_memory_bytes{worker, gpu} and deployd_gpu_utilization_percent{gpu}, read
    from NVML when scraped (server.pool.gpustats); no series at all without GPUs or NVML."""

    def __init__(self, source: Callable[[], list[tuple[int, int, GpuUsage]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        readings = self._source()
        if not readings:
            return
        memory = GaugeMetricFamily(
            "deployd_worker_gpu_memory_bytes",
            "Each GPU worker's memory on its GPU (NVML; the keeper's shared weights are not counted here)",
            labels=["worker", "gpu"],
        )
        utilization = GaugeMetricFamily(
            "deployd_gpu_utilization_percent",
            "Each GPU's utilisation over NVML's last sample period, for the GPUs of pool.gpus",
            labels=["gpu"],
        )
        seen: set[int] = set()
        for index, gpu, usage in readings:
            if usage.memory_bytes is not None:
                memory.add_metric([str(index), str(gpu)], usage.memory_bytes)
            if usage.utilization_percent is not None and gpu not in seen:
                seen.add(gpu)
                utilization.add_metric([str(gpu)], usage.utilization_percent)
        yield memory
        yield utilization


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
