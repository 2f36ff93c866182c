"""Spans of the daemon's calls, through OpenTelemetry's API (README: "Tracing").

While tracing is off (the default) nothing here makes a span, reads a header or imports
OpenTelemetry: every function returns at once. server.app.tracing installs the SDK and its
exporter and calls `start`; every other room uses only this module.

One call to a model, as spans (the hops are timed where they happen and recorded here, in the
daemon, with their own start and end times):

    <edge>  deployd.v1/Invoke, inference.GRPCInferenceService/ModelInfer, HTTP ModelInfer
      │     a W3C traceparent in the metadata or headers is continued (its span is the parent)
      ├─ deployd.queue       the wait for a free worker                (server.pool.dispatcher)
      ├─ deployd.to_worker   the request's hop: the daemon writes -> the worker has read it
      ├─ deployd.model_run   the worker's run of it, timed by the worker's clock
      └─ deployd.to_daemon   the reply's hop: the worker writes -> the daemon has read it

A batched call's wait for its batch is its own span, deployd.batch_wait, linked to the batch's
deployd.batch span: a root of its own trace (it serves many callers), which links back to every
caller's edge span and holds the batch's queue and hop spans.

Times: the worker's timestamps are CLOCK_MONOTONIC nanoseconds (shared by all processes), and
so is time.perf_counter on Linux; a span wants wall-clock nanoseconds, so each is shifted by
the clocks' difference, read once per recording so that siblings stay end to end.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

# Attribute names, one vocabulary for every span.
MODEL = "deployd.model"  # the name or object id the caller addressed
VERSION = "deployd.version"  # the version asked for (0 or "": the serving one)
OBJECT_ID = "deployd.object_id"  # the loaded object that ran it
WORKER_SLOT = "deployd.worker.slot"
WORKER_PID = "deployd.worker.pid"
BATCH_SIZE = "deployd.batch.size"  # rows of one batch
BATCH_CALLS = "deployd.batch.calls"  # callers joined in it
STATUS = "deployd.status"  # the call's status code name (OK, NOT_FOUND, ...); a run's: ok or error

_TRACE_HEADERS = ("traceparent", "tracestate")

# Set by start(): the tracer and the few OpenTelemetry names the hot path needs.
_tracer: Any = None
_otel: Any = None  # the opentelemetry.trace module
_propagator: Any = None
_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()


def start(tracer: Any) -> None:
    """Spans from now on, made by tracer (server.app.tracing's, over the SDK's provider)."""
    global _tracer, _otel, _propagator
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _otel, _propagator, _tracer = trace, TraceContextTextMapPropagator(), tracer


def stop() -> None:
    """No more spans (tests; the daemon's tracing ends with its process)."""
    global _tracer
    _tracer = None


def enabled() -> bool:
    return _tracer is not None


# ---------------------------------------------------------------------------- the edge


def edge(
    name: str, headers: Callable[[], Any], attributes: Mapping[str, Any]
) -> contextlib.AbstractContextManager[Any]:
    """The span of one call at the edge, current while the call runs; the caller's span, from a
    traceparent in headers() (gRPC metadata pairs, or a mapping of HTTP headers), is its parent.
    Gives the span, or None while tracing is off (then headers is never called)."""
    if _tracer is None:
        return _OFF
    return _edge_span(name, headers(), attributes)


@contextlib.contextmanager
def _edge_span(name: str, headers: Any, attributes: Mapping[str, Any]) -> Iterator[Any]:
    carrier = _trace_headers(headers)
    parent = _propagator.extract(carrier) if carrier else None
    with _tracer.start_as_current_span(
        name,
        context=parent,
        kind=_otel.SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,  # a domain error is the call's status, set by the edge
        set_status_on_exception=False,
    ) as span:
        yield span


def _trace_headers(headers: Any) -> dict[str, str]:
    if isinstance(headers, Mapping) or hasattr(headers, "getone"):  # HTTP: case-insensitive already
        return {key: str(headers[key]) for key in _TRACE_HEADERS if key in headers}
    return {key: str(value) for key, value in headers or () if key in _TRACE_HEADERS}


def set_status(span: Any, code: str, ok: bool) -> None:
    """A call's outcome on its edge span (None: tracing is off): code's name, and an error
    status unless ok."""
    if span is None:
        return
    span.set_attribute(STATUS, code)
    if not ok:
        span.set_status(_otel.Status(_otel.StatusCode.ERROR, code))


def annotate(**attributes: Any) -> None:
    """Attributes on the current span (the edge's, or a batch's); nothing while off."""
    if _tracer is None:
        return
    span = _otel.get_current_span()
    for key, value in attributes.items():
        span.set_attribute(_ATTRIBUTE_NAMES.get(key, key), value)


_ATTRIBUTE_NAMES = {"model": MODEL, "version": VERSION, "object_id": OBJECT_ID}


# ---------------------------------------------------------------------------- pool


def record_queue(queued_at: float, running_since: float, slot: int, pid: int) -> None:
    """The wait for a free worker (time.perf_counter seconds), under the current span."""
    if not _in_traced_call():
        return
    shift = _shift()
    attributes = {WORKER_SLOT: slot, WORKER_PID: pid}
    _record("deployd.queue", _ns(queued_at) + shift, _ns(running_since) + shift, attributes)


def record_worker_call(
    sent_at: float, times: Sequence[int] | None, answered_at: float, slot: int, pid: int, object_id: str, ok: bool
) -> None:
    """One request's trip to a worker and back, under the current span: sent_at and answered_at
    are the daemon's (time.perf_counter seconds), times the worker's (monotonic ns: read the
    request, began writing the reply). Without the worker's times (it died): one span for it all."""
    if not _in_traced_call():
        return
    shift = _shift()
    sent, answered = _ns(sent_at) + shift, _ns(answered_at) + shift
    where = {WORKER_SLOT: slot, WORKER_PID: pid, OBJECT_ID: object_id}
    if times is None:
        _record("deployd.worker_call", sent, answered, where, ok=False)
        return
    received, replied = times[0] + shift, times[1] + shift
    _record("deployd.to_worker", sent, received, where)
    _record("deployd.model_run", received, replied, {**where, STATUS: "ok" if ok else "error"}, ok=ok)
    _record("deployd.to_daemon", replied, answered, where)


def _in_traced_call() -> bool:
    """Tracing is on and a recorded span is current: a traced call's, or its batch's. The pool
    serves requests that are no traced call too (a session's steps, replays into a new
    worker): their waits and hops would each be a trace of one span."""
    return _tracer is not None and bool(_otel.get_current_span().is_recording())


def _record(
    name: str,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Any],
    ok: bool = True,
    parent: Any = None,
    links: Sequence[Any] = (),
) -> Any:
    context = _otel.set_span_in_context(_otel.NonRecordingSpan(parent)) if parent is not None else None
    span = _tracer.start_span(name, context=context, attributes=attributes, links=links, start_time=start_ns)
    if not ok:
        span.set_status(_otel.Status(_otel.StatusCode.ERROR))
    span.end(end_time=max(end_ns, start_ns))
    return span


def _shift() -> int:
    """Add to a monotonic nanosecond time to get the wall clock's."""
    return time.time_ns() - time.monotonic_ns()


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


# ---------------------------------------------------------------------------- batching


def caller() -> Any:
    """The current span's context, for a batch to link to; None while off."""
    if _tracer is None:
        return None
    return _otel.get_current_span().get_span_context()


def batch(
    callers: Iterable[tuple[Any, float]], sent_at: float, attributes: Mapping[str, Any]
) -> contextlib.AbstractContextManager[Any]:
    """A batch's span, current while the batch runs: a root linked to every caller's span.
    callers: (the caller's span context from `caller`, when it began to wait: perf_counter s);
    each caller gets its own deployd.batch_wait span, up to sent_at, linked to the batch."""
    if _tracer is None:
        return _OFF
    return _batch_span(list(callers), sent_at, attributes)


@contextlib.contextmanager
def _batch_span(callers: list[tuple[Any, float]], sent_at: float, attributes: Mapping[str, Any]) -> Iterator[Any]:
    shift = _shift()
    traced = [(context, arrived) for context, arrived in callers if context is not None and context.is_valid]
    links = [_otel.Link(context) for context, _ in traced]
    # From its oldest caller's arrival: the batch's forming, then its run.
    formed_from = _ns(min((arrived for _, arrived in callers), default=sent_at)) + shift
    root = _otel.set_span_in_context(_otel.INVALID_SPAN)  # never the first caller's, whose task made this
    span = _tracer.start_span("deployd.batch", context=root, attributes=attributes, links=links, start_time=formed_from)
    # Each caller's wait, in the caller's trace (kept or not as the caller's is), linked to the
    # batch (whether or not the batch's own trace is kept).
    batch_link = [_otel.Link(span.get_span_context())]
    for context, arrived in traced:
        _record("deployd.batch_wait", _ns(arrived) + shift, _ns(sent_at) + shift, {}, parent=context, links=batch_link)
    with _otel.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
        yield span


# ---------------------------------------------------------------------------- a data port


def model_run(slot: int, pid: int, object_id: str) -> contextlib.AbstractContextManager[Any]:
    """A model's run in this process (a worker's data port, where the worker is the edge), a
    child of the current span; None while off."""
    if _tracer is None:
        return _OFF
    attributes = {WORKER_SLOT: slot, WORKER_PID: pid, OBJECT_ID: object_id}
    return _tracer.start_as_current_span(  # type: ignore[no-any-return]
        "deployd.model_run", attributes=attributes, record_exception=False, set_status_on_exception=False
    )
