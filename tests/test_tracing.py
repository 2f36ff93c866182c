"""Tracing on the real daemon, exported to a real OTLP/gRPC receiver the test serves (the
collector's TraceService from opentelemetry-proto): the edge span continues the caller's
traceparent (the client's propagate_trace, a v2 client's headers, an HTTP header), the pool's
spans nest under it with their attributes, and a batch's span links to its callers. Off, the
daemon neither imports OpenTelemetry nor connects anywhere."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from client import InterpreterManager, NotFoundError
from tests.conftest import write_config
from tests.daemon_process import REPO, DaemonProcess, wait_until
from tests.test_batching import run_threads

MODELS = [
    {"name": "echo", "package": "models.pt", "pickle": "models:echo.pkl"},
    {
        "name": "probe",
        "package": "models.pt",
        "pickle": "models:batch_probe.pkl",
        "batching": {"max_batch_size": 16, "max_queue_delay_ms": 20},
    },
]
WAIT_SECONDS = 10.0  # for a call's spans to reach the collector (export_delay_ms: 50)
POOL_SPANS = ("deployd.queue", "deployd.to_worker", "deployd.model_run", "deployd.to_daemon")


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps every span it is sent, with its resource's attributes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[tuple[dict[str, Any], Any]] = []
        self.exports = 0

    def Export(self, request: Any, context: Any) -> Any:
        with self._lock:
            self.exports += 1
            for resource_spans in request.resource_spans:
                resource = attributes_of(resource_spans.resource)
                for scope_spans in resource_spans.scope_spans:
                    self._spans.extend((resource, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: bytes | None = None) -> list[Any]:
        with self._lock:
            return [span for _, span in self._spans if trace_id is None or span.trace_id == trace_id]

    def resources(self) -> list[dict[str, Any]]:
        with self._lock:
            return [resource for resource, _ in self._spans]


def attributes_of(holder: Any) -> dict[str, Any]:
    found = {}
    for pair in holder.attributes:
        kind = pair.value.WhichOneof("value")
        found[pair.key] = getattr(pair.value, kind) if kind else None
    return found


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, int]]:
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, port
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def traced_daemon(
    package_dir: Path, tmp_path_factory: pytest.TempPathFactory, collector: tuple[Collector, int]
) -> Iterator[DaemonProcess]:
    path = tmp_path_factory.mktemp("tracing") / "config.yaml"
    tracing = {"endpoint": f"127.0.0.1:{collector[1]}", "export_delay_ms": 50, "service_name": "deployd-test"}
    # The daemon path: its spans (queue, hops). A data port's: test_a_data_port_is_the_edge_...
    write_config(path, package_dir, tracing=tracing, server={"http_address": "127.0.0.1:0"}, pool={"data_ports": -1})
    config = yaml.safe_load(path.read_text())
    config["models"] = MODELS
    path.write_text(yaml.safe_dump(config))
    process = DaemonProcess(path).start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


@pytest.fixture(scope="module")
def tracer() -> Any:
    """The caller's own tracer: its spans are only there to be continued (nothing exports them)."""
    return TracerProvider().get_tracer("test-caller")


def traceparent() -> dict[str, str]:
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier


def wait_for_spans(receiver: Collector, trace_id: bytes, names: set[str]) -> dict[str, Any]:
    """The trace's spans by name, once every one of names has arrived (at most WAIT_SECONDS)."""
    wait_until(lambda: names <= {span.name for span in receiver.spans(trace_id)}, WAIT_SECONDS)
    spans = {span.name: span for span in receiver.spans(trace_id)}
    assert names <= set(spans), f"missing spans {names - set(spans)}; got {sorted(spans)}"
    return spans


def assert_nests(parent: Any, child: Any) -> None:
    assert child.parent_span_id == parent.span_id, f"{child.name} is not a child of {parent.name}"
    assert parent.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano, child.name
    assert child.end_time_unix_nano <= parent.end_time_unix_nano, f"{child.name} ends after {parent.name}"


def assert_call_under(edge: Any, spans: dict[str, Any], model: str) -> None:
    """The pool's spans are the edge span's children, nest in it, follow one another, and name
    the worker; the edge span names the model and its status."""
    for name in POOL_SPANS:
        assert_nests(edge, spans[name])
    queue, there, run, back = (spans[name] for name in POOL_SPANS)
    assert queue.end_time_unix_nano <= there.start_time_unix_nano + 1_000_000  # 1 ms: two clocks read apart
    assert there.end_time_unix_nano == run.start_time_unix_nano
    assert run.end_time_unix_nano == back.start_time_unix_nano
    assert run.end_time_unix_nano > run.start_time_unix_nano
    run_attributes = attributes_of(run)
    assert run_attributes["deployd.worker.slot"] in (0, 1)
    assert run_attributes["deployd.worker.pid"] > 0
    assert run_attributes["deployd.status"] == "ok"
    assert run_attributes["deployd.object_id"].startswith("obj-")
    edge_attributes = attributes_of(edge)
    assert edge_attributes["deployd.model"] == model
    assert edge_attributes["deployd.status"] == "OK"
    assert edge_attributes["deployd.object_id"] == run_attributes["deployd.object_id"]
    assert "deployd.version" in edge_attributes


def test_a_grpc_invoke_continues_the_callers_trace(
    traced_daemon: DaemonProcess, collector: tuple[Collector, int], tracer: Any
) -> None:
    receiver = collector[0]
    with (
        InterpreterManager(traced_daemon.target, timeout=60, propagate_trace=True) as manager,
        tracer.start_as_current_span("caller") as caller,
    ):
        assert torch.equal(manager.model("echo")(torch.ones(3)), torch.ones(3))
    context = caller.get_span_context()
    trace_id = context.trace_id.to_bytes(16, "big")
    spans = wait_for_spans(receiver, trace_id, {"deployd.v1.Deployd/Invoke", *POOL_SPANS})
    edge = spans["deployd.v1.Deployd/Invoke"]
    assert edge.parent_span_id == context.span_id.to_bytes(8, "big")
    assert edge.kind == edge.SPAN_KIND_SERVER
    assert attributes_of(edge)["deployd.version"] == 0
    assert_call_under(edge, spans, "echo")
    assert {"service.name": "deployd-test"}.items() <= receiver.resources()[0].items()


def test_a_failed_call_carries_its_status(
    traced_daemon: DaemonProcess, collector: tuple[Collector, int], tracer: Any
) -> None:
    with (
        InterpreterManager(traced_daemon.target, timeout=60, propagate_trace=True) as manager,
        tracer.start_as_current_span("caller") as caller,
        pytest.raises(NotFoundError),
    ):
        manager.model("no-such-model")(1)
    trace_id = caller.get_span_context().trace_id.to_bytes(16, "big")
    edge = wait_for_spans(collector[0], trace_id, {"deployd.v1.Deployd/Invoke"})["deployd.v1.Deployd/Invoke"]
    assert attributes_of(edge)["deployd.status"] == "NOT_FOUND"
    assert edge.status.code == edge.status.STATUS_CODE_ERROR


def test_kserve_v2_over_grpc_and_http_continue_a_traceparent(
    traced_daemon: DaemonProcess, collector: tuple[Collector, int], tracer: Any
) -> None:
    receiver = collector[0]
    x = np.ones((1, 4), dtype=np.float32)
    with tracer.start_as_current_span("grpc caller") as grpc_caller:
        client = triton.InferenceServerClient(traced_daemon.target)
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        try:
            client.infer("echo", [tensor], headers=traceparent())
        finally:
            client.close()
    with tracer.start_as_current_span("http caller") as http_caller:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}
        request = urllib.request.Request(
            f"{traced_daemon.http_url}/v2/models/echo/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **traceparent()},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
    for caller, name in ((grpc_caller, "inference.GRPCInferenceService/ModelInfer"), (http_caller, "HTTP ModelInfer")):
        context = caller.get_span_context()
        spans = wait_for_spans(receiver, context.trace_id.to_bytes(16, "big"), {name, *POOL_SPANS})
        assert spans[name].parent_span_id == context.span_id.to_bytes(8, "big")
        assert_call_under(spans[name], spans, "echo")


def test_batched_callers_link_to_their_batch(
    traced_daemon: DaemonProcess, collector: tuple[Collector, int], tracer: Any
) -> None:
    """Callers that meet in a batch: each waits in a deployd.batch_wait span (a child of its edge
    span) linked to the batch's span, which links back to every caller's edge span and holds the
    batch's run on a worker."""
    receiver = collector[0]
    callers: list[Any] = []

    def work(thread: int) -> int:
        largest = 0
        with InterpreterManager(traced_daemon.target, timeout=60, propagate_trace=True) as manager:
            probe = manager.model("probe")
            for _ in range(5):
                with tracer.start_as_current_span(f"caller {thread}") as caller:
                    _, rows = probe(torch.full((1, 4), float(thread)))
                callers.append(caller.get_span_context())
                largest = max(largest, int(rows[0]))
        return largest

    results = run_threads(8, work)
    assert max(results) > 1, f"no call was batched with another: {results}"

    def batches() -> list[Any]:
        return [span for span in receiver.spans() if span.name == "deployd.batch" and len(span.links) > 1]

    assert wait_until(lambda: bool(batches()), WAIT_SECONDS), "no batch of several callers was traced"
    batch = batches()[0]
    assert batch.parent_span_id == b""  # a root: it serves many traces
    attributes = attributes_of(batch)
    assert attributes["deployd.batch.size"] == attributes["deployd.batch.calls"] == len(batch.links)
    assert attributes["deployd.model"] == "probe"
    # Its run on a worker lies under it.
    run = wait_for_spans(receiver, batch.trace_id, {"deployd.model_run"})["deployd.model_run"]
    assert_nests(batch, run)
    # Each linked caller: its edge span, whose deployd.batch_wait links back to the batch.
    caller_ids = {(context.trace_id.to_bytes(16, "big"), context.span_id.to_bytes(8, "big")) for context in callers}
    for link in batch.links:
        spans = wait_for_spans(receiver, link.trace_id, {"deployd.v1.Deployd/Invoke", "deployd.batch_wait"})
        edge, waited = spans["deployd.v1.Deployd/Invoke"], spans["deployd.batch_wait"]
        assert edge.span_id == link.span_id
        assert (edge.trace_id, edge.parent_span_id) in caller_ids
        assert_nests(edge, waited)
        assert [(item.trace_id, item.span_id) for item in waited.links] == [(batch.trace_id, batch.span_id)]
        assert waited.end_time_unix_nano <= run.start_time_unix_nano


def test_a_data_port_is_the_edge_and_records_the_run_itself(
    package_dir: Path, tmp_path: Path, collector: tuple[Collector, int], tracer: Any
) -> None:
    """With data ports the client calls a worker straight: the worker's process makes the edge
    span (continuing the traceparent) and the model's run under it, and sends them itself."""
    receiver = collector[0]
    tracing = {"endpoint": f"127.0.0.1:{collector[1]}", "export_delay_ms": 50}
    config = write_config(tmp_path / "config.yaml", package_dir, tracing=tracing, pool={"workers": 1, "data_ports": 0})
    models = yaml.safe_load(config.read_text())
    models["models"] = MODELS[:1]
    config.write_text(yaml.safe_dump(models))
    process = DaemonProcess(config).start()
    try:
        with (
            InterpreterManager(process.target, timeout=60, direct=True, propagate_trace=True) as manager,
            tracer.start_as_current_span("caller") as caller,
        ):
            assert manager.model("echo")(5) == 5
        context = caller.get_span_context()
        spans = wait_for_spans(
            receiver, context.trace_id.to_bytes(16, "big"), {"deployd.v1.Deployd/Invoke", "deployd.model_run"}
        )
    finally:
        process.assert_clean_stop()
    edge, run = spans["deployd.v1.Deployd/Invoke"], spans["deployd.model_run"]
    assert edge.parent_span_id == context.span_id.to_bytes(8, "big")
    assert_nests(edge, run)
    assert "deployd.to_worker" not in spans  # no hop through the daemon: the worker answered
    run_attributes = attributes_of(run)
    assert run_attributes["deployd.worker.slot"] == 0
    assert run_attributes["deployd.status"] == "ok"
    assert attributes_of(edge)["deployd.status"] == "OK"
    assert attributes_of(edge)["deployd.model"] == "echo"


def test_a_collector_that_is_down_fails_no_call(package_dir: Path, tmp_path: Path) -> None:
    """Spans that cannot leave are dropped on the exporter's thread: calls are answered, and the
    daemon stops (its flush bounded) with exit 0."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        closed_port = taken.getsockname()[1]  # closed again below: nothing listens there
    tracing = {"endpoint": f"127.0.0.1:{closed_port}", "export_delay_ms": 50}
    config = write_config(tmp_path / "config.yaml", package_dir, tracing=tracing, pool={"workers": 1})
    process = DaemonProcess(config).start()
    try:
        with InterpreterManager(process.target, timeout=60) as manager:
            echo = manager.load_package(package_dir / "models.pt").load_pickle("models", "echo.pkl")
            assert [echo(index) for index in range(20)] == list(range(20))
    finally:
        started = time.monotonic()
        process.assert_clean_stop()
    assert time.monotonic() - started < 30


def test_tracing_off_makes_no_connection(package_dir: Path, tmp_path: Path) -> None:
    """Off (no tracing.endpoint), even with OpenTelemetry's own variables pointing somewhere, the
    daemon connects to no collector: nothing arrives at a listening socket."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    environment = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{address}", "OTEL_TRACES_EXPORTER": "otlp"}
    config = write_config(tmp_path / "config.yaml", package_dir, pool={"workers": 1})
    process = DaemonProcess(config, env=environment).start()
    try:
        with (
            InterpreterManager(process.target, timeout=60, propagate_trace=True) as manager,
            TracerProvider().get_tracer("test-caller").start_as_current_span("caller"),
        ):
            echo = manager.load_package(package_dir / "models.pt").load_pickle("models", "echo.pkl")
            assert echo(7) == 7
    finally:
        process.assert_clean_stop()
    with listener, pytest.raises(BlockingIOError):
        listener.accept()


def test_the_pool_records_spans_only_under_a_traced_call() -> None:
    """A session's step or a replay is no traced call: its wait and hops make no trace of their own."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from server import tracing as daemon_tracing

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")
    daemon_tracing.start(tracer)
    try:
        now = time.perf_counter()
        daemon_tracing.record_queue(now - 0.002, now - 0.001, 0, 1)
        assert exported.get_finished_spans() == ()
        with tracer.start_as_current_span("call") as call:
            daemon_tracing.record_queue(now - 0.002, now - 0.001, 0, 1)
            daemon_tracing.record_worker_call(now - 0.001, None, now, 0, 1, "obj-1", False)
    finally:
        daemon_tracing.stop()
    queue, lost, _ = exported.get_finished_spans()
    assert (queue.name, lost.name) == ("deployd.queue", "deployd.worker_call")
    assert queue.parent is not None and queue.parent.span_id == call.get_span_context().span_id
    assert queue.end_time - queue.start_time == pytest.approx(1_000_000, abs=1000)
    assert not lost.status.is_ok  # the worker died: no times of its own, an error


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = (
        "import sys; from server.app import daemon; from server.app.config import TracingSection;"
        " from server.app.tracing import start_tracing; from server import tracing;"
        " assert start_tracing(TracingSection()) is None and not tracing.enabled();"
        " assert tracing.edge('x', lambda: 1 / 0, {}).__enter__() is None;"  # headers never read
        " sys.exit(int(any(name.startswith('opentelemetry') for name in sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr or "OpenTelemetry was imported with tracing off"
