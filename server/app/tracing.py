"""Tracing's setup: OpenTelemetry's SDK provider and its OTLP/gRPC exporter, from the `tracing:`
section; off (nothing imported, nothing started) while tracing.endpoint is empty.

The exporter lives in the daemon alone. The workers' part of a call (the model's run) is timed
by the worker, whose reply carries the times already (protocol notes "times"), and recorded
here with them: no exporter, grpc or thread in a worker, nothing new on the channel, and one
process to flush at shutdown. See server.tracing for the spans.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from server import tracing
from server.app.config import TracingSection

log = logging.getLogger(__name__)

EXPORT_TIMEOUT_SECONDS = 5.0  # one export to the collector
FLUSH_SECONDS = 5.0  # at shutdown, for the last spans to leave


def start_tracing(section: TracingSection) -> Callable[[], None] | None:
    """Spans from now on, sent to section.endpoint; returns what ends it (flushes the last
    spans, for at most FLUSH_SECONDS). None: tracing is off."""
    if not section.endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    # A caller's sampled flag decides for its trace; the ratio, for traces the daemon starts.
    sampler = ParentBased(TraceIdRatioBased(section.sample_ratio))
    provider = TracerProvider(resource=Resource.create({"service.name": section.service_name}), sampler=sampler)
    exporter = OTLPSpanExporter(endpoint=section.endpoint, insecure=section.insecure, timeout=EXPORT_TIMEOUT_SECONDS)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=section.export_delay_ms))
    tracing.start(provider.get_tracer("deployd"))
    log.info("tracing to %s (sample ratio %g)", section.endpoint, section.sample_ratio)

    def stop_tracing() -> None:
        tracing.stop()
        # The SDK's shutdown waits up to 30 s for a collector that does not answer: bounded here.
        flushing = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
        flushing.start()
        flushing.join(FLUSH_SECONDS)
        if flushing.is_alive():
            log.warning("tracing: the last spans were not sent within %.0fs", FLUSH_SECONDS)

    return stop_tracing
