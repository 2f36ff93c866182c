"""The caller's span, sent with a call (opt-in: `propagate_trace=True`) as W3C trace context
metadata (`traceparent`, `tracestate`), so that the daemon's spans join the caller's trace.

OpenTelemetry stays optional for clients: it is imported only by a client that opts in.
"""

from __future__ import annotations

from collections.abc import Callable

TraceMetadata = Callable[[], tuple[tuple[str, str], ...]]


def trace_metadata_source() -> TraceMetadata:
    """What gives the current span's trace context as call metadata (nothing outside a span).
    ImportError, saying what to install, without opentelemetry-api."""
    try:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as error:
        raise ImportError("propagate_trace=True needs opentelemetry-api (pip install opentelemetry-api)") from error
    propagator = TraceContextTextMapPropagator()

    def trace_metadata() -> tuple[tuple[str, str], ...]:
        carrier: dict[str, str] = {}
        propagator.inject(carrier)
        return tuple(carrier.items())

    return trace_metadata
