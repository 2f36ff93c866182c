"""What every protocol's servicer shares: domain errors become statuses, each call is counted
and logged, and a generated service is registered with tolerant parsing and byte counts.

STATUS_FOR_ERROR is the one table from domain error to gRPC status code, for deployd.v1
and KServe v2 alike.

`register_service` takes the generated add_*_to_server's method table with two changes: a
request that does not parse reaches its handler as a MalformedRequest (so it fails
INVALID_ARGUMENT, counted and logged like any call, instead of grpc's bare UNKNOWN), and
message bytes are counted from the serialized bytes grpc already holds (never by
serializing again).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, NamedTuple, NoReturn, Protocol, TypeAlias, TypeVar

import grpc
from google.protobuf.message import DecodeError

from deployd_wire.proto import deployd_pb2 as pb
from server import errors, tracing
from server.api.metrics import Metrics
from server.api.model_failures import (
    REQUEST_ID_KEY,
    caller_request_id,
    log_whole_traceback,
    new_call_id,
    where_it_is,
)
from server.errors import DeploydError, InvalidArgument
from server.models.names import NamedModel
from server.pool.deadlines import caller_deadline_ns, deadline_in

log = logging.getLogger(__name__)
calls_log = logging.getLogger("deployd.calls")

# grpc ships no type hints: a servicer context is typed as what it is to mypy, Any.
Context: TypeAlias = Any

ERROR_DETAIL_KEY = "deployd-error-detail-bin"
# gRPC's retry protocol: a negative pushback tells any gRPC client not to retry the call.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# A status message quotes what the caller sent (names, versions). It travels percent-encoded
# (3 bytes for each byte of UTF-8 outside printable ASCII) in metadata that grpc clients take
# up to 8 KiB of: past that the caller gets RESOURCE_EXHAUSTED instead of the error. So it is
# cut to this many bytes of UTF-8 (at most 6000 encoded).
MAX_MESSAGE_BYTES = 2000
# The error trailer (ErrorDetail, base64 on the wire) shares that budget with the message: its
# traceback is cut so that message and trailer stay under this many bytes on the wire, below
# grpc's 8 KiB soft limit with room for the other headers.
METADATA_BUDGET = 7000
MAX_LOGGED_TARGET = 200  # bytes of the object or model a log line names

# Most specific first: the first matching class decides.
STATUS_FOR_ERROR: list[tuple[type[DeploydError], grpc.StatusCode]] = [
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.PathNotAllowed, grpc.StatusCode.PERMISSION_DENIED),
    (errors.TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.WorkerCrashed, grpc.StatusCode.UNAVAILABLE),
    (errors.PoolClosed, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.CallCancelled, grpc.StatusCode.CANCELLED),
    (errors.ModelError, grpc.StatusCode.UNKNOWN),
]


def status_for(error: DeploydError) -> grpc.StatusCode:
    for error_type, code in STATUS_FOR_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


class Servicer:
    """What a servicer holds for its calls to be counted and logged."""

    _metrics: Metrics
    _log_calls: bool


class ModelCalls(Protocol):
    """What the call handlers (Invoke, HasAttr, v2's inference) need of the models: the
    daemon's domain service (server.models.service), or a data port's table of what its
    worker holds (server.api.dataport)."""

    async def invoke(
        self, target: str, version: int, method: str, args: list[Any], kwargs: dict[str, Any], buffers: list[Any]
    ) -> tuple[Any, list[Any]]: ...

    async def has_attr(self, target: str, version: int, name: str) -> bool: ...

    def named_model(self, name: str) -> NamedModel: ...

    def served_names(self) -> set[str]: ...

    def has_workers(self, object_id: str) -> bool:
        """Whether a worker that holds the object serves (a placed model's may all be down)."""
        ...


Handler = TypeVar("Handler", bound=Callable[..., Any])


def call_handlers(
    model_of: Callable[[Any], str],
    per_model: frozenset[str] = frozenset(),
    loads: Mapping[str, str] | None = None,
    service: str = "",
) -> Callable[[Handler], Handler]:
    """A decorator for one protocol's handlers, unary (a coroutine) and streaming (an async
    generator) alike: a domain error raised by a handler becomes its status, its message cut to
    MAX_MESSAGE_BYTES, with remote details attached; each call is counted (status, duration,
    bytes) and logged in one line.

    A stream is counted once, when its first message leaves (it is open) or when it ends before
    one; an error later in the stream still ends it with its status, cut the same way; its log
    line, once the stream is done, gives how it ended.

    model_of: what the request addresses (an object id or a model name), for the log line;
    per_model: the methods whose metrics carry it as a label (others are few, and their series
    would outlive the model); loads: method -> kind, for the load duration histogram.

    With tracing on, each call of a per_model method (a call to a model) has a span named
    "service/method", continuing the caller's traceparent (server.tracing.edge).
    """
    load_kinds = dict(loads or {})

    def decorate(handler: Handler) -> Handler:
        method = handler.__name__

        def start(servicer: Servicer, request: Any, context: Context) -> _Call:
            # What the call sends to a worker carries its deadline (deployd_worker.deadline()).
            caller_deadline_ns.set(deadline_in(context.time_remaining()))
            target = "" if isinstance(request, MalformedRequest) else _cut(model_of(request), MAX_LOGGED_TARGET)
            labelled = method in per_model
            return _Call(servicer, context, method, target, labelled, load_kinds.get(method))

        if inspect.isasyncgenfunction(handler):

            @functools.wraps(handler)
            async def stream_wrapper(self: Servicer, request: Any, context: Context) -> AsyncIterator[Any]:
                call = start(self, request, context)
                try:
                    _refuse_malformed(request)
                    async with contextlib.aclosing(handler(self, request, context)) as messages:
                        async for message in messages:
                            call.finish(grpc.StatusCode.OK)  # no-op after the first
                            yield message
                except Exception as error:
                    await call.fail(error)
                except asyncio.CancelledError:
                    call.finish(grpc.StatusCode.CANCELLED)
                    raise
                call.finish(grpc.StatusCode.OK)

            return stream_wrapper  # type: ignore[return-value]

        async def serve(self: Servicer, request: Any, context: Context, span: Any = None) -> Any:
            call = start(self, request, context)
            call.span = span
            try:
                _refuse_malformed(request)
                response = await handler(self, request, context)
            except Exception as error:
                await call.fail(error)
            except asyncio.CancelledError:
                call.finish(grpc.StatusCode.CANCELLED)
                raise
            call.finish(grpc.StatusCode.OK)
            return response

        if method not in per_model:
            return functools.wraps(handler)(serve)  # type: ignore[return-value]
        span_name = f"{service}/{method}"

        @functools.wraps(handler)
        async def traced(self: Servicer, request: Any, context: Context) -> Any:
            if not tracing.enabled():
                return await serve(self, request, context)
            model = "" if isinstance(request, MalformedRequest) else _cut(model_of(request), MAX_LOGGED_TARGET)
            attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, tracing.MODEL: model}
            with tracing.edge(span_name, context.invocation_metadata, attributes) as span:
                return await serve(self, request, context, span)

        return traced  # type: ignore[return-value]

    return decorate


def _refuse_malformed(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidArgument(request.describe())


class _Call:
    """One call through call_handlers: in flight from its start, counted once (at its answer,
    or a stream's first message), logged once done with how it ended."""

    def __init__(
        self, servicer: Servicer, context: Context, method: str, target: str, labelled: bool, load_kind: str | None
    ) -> None:
        self._metrics = servicer._metrics
        self._log_calls = servicer._log_calls
        self._context = context
        self._method = method
        self._target = target
        self._labelled = labelled
        self._load_kind = load_kind
        self._started = time.perf_counter()
        self._counted = False
        self._call_id = ""
        self._code, self._seconds = grpc.StatusCode.OK, 0.0
        self.span: Any = None  # the call's edge span (server.tracing), when traced
        self._metrics.call_started()

    def finish(self, code: grpc.StatusCode) -> None:
        """The call has its answer (code): counted the first time, and logged once it is done."""
        seconds = time.perf_counter() - self._started
        if not self._counted:
            # Before the answer leaves, so a caller that has its answer finds it counted.
            self._counted = True
            metrics = self._metrics
            metrics.call_ended()
            # Not a name that is not loaded: every caller's typo would be a series for good.
            label = self._target if self._labelled and code != grpc.StatusCode.NOT_FOUND else ""
            metrics.observe_call(self._method, label, code.name, seconds)
            if self._load_kind is not None and code == grpc.StatusCode.OK:
                metrics.load_duration.labels(self._load_kind).observe(seconds)
            if self._log_calls:
                # Once the answer has left: the line costs the caller no latency.
                self._context.add_done_callback(lambda _: self._log())
        self._code, self._seconds = code, seconds
        tracing.set_status(self.span, code.name, code == grpc.StatusCode.OK)

    @property
    def call_id(self) -> str:
        """The caller's x-request-id, or one made up; taken only when needed (an error, a log line)."""
        if not self._call_id:
            self._call_id = caller_request_id(self._context.invocation_metadata()) or new_call_id()
        return self._call_id

    def _log(self) -> None:
        _log_call(self.call_id, self._method, self._target, self._code, self._seconds)

    async def fail(self, error: Exception) -> NoReturn:
        """End the call with error's status (a domain error's own, else INTERNAL): its message
        cut to MAX_MESSAGE_BYTES, remote details in the trailing metadata. Never returns."""
        if isinstance(error, DeploydError):
            code = status_for(error)
            call_id = ""
            if error.remote_traceback:
                # The model's traceback: whole in the log once, and the answer says where.
                call_id = self.call_id
                log_whole_traceback(call_id, self._method, self._target, error)
                note = f" ({where_it_is(call_id)})"
                message = _cut(str(error), MAX_MESSAGE_BYTES - len(note)) + note
            else:
                message = _cut(str(error), MAX_MESSAGE_BYTES)
            self._context.set_trailing_metadata(error_metadata(error, message, call_id))
        else:
            log.exception("internal error in %s", self._method, exc_info=error)
            code = grpc.StatusCode.INTERNAL
            message = _cut(f"internal error: {type(error).__name__}: {error}", MAX_MESSAGE_BYTES)
        self.finish(code)
        await self._context.abort(code, message)
        raise AssertionError("context.abort returned")  # pragma: no cover


def _cut(text: str, limit: int) -> str:
    """text in at most limit bytes of UTF-8: cut short, saying so, if longer."""
    if len(text) * 4 <= limit:  # fits whatever its characters (a call's model name, every call)
        return text
    data = text.encode()
    if len(data) <= limit:
        return text
    return f"{data[: limit - 40].decode(errors='ignore')}... (cut: {len(data)} bytes)"


def _cut_traceback(text: str, limit: int, call_id: str = "") -> str:
    """A traceback in at most limit bytes of UTF-8. Its last lines say most (where it was
    raised, and the exception), so long lines are shortened first, then the start is dropped;
    the note saying so names the call id the whole one is logged under."""
    if len(text.encode()) <= limit:
        return text
    lines = [_cut(line, 300) for line in text.splitlines()]
    kept: list[str] = []
    where = f"; {where_it_is(call_id)}" if call_id else ""
    used = 60 + len(where)  # the note saying so
    for line in reversed(lines):
        used += len(line.encode()) + 1
        if used > limit:
            break
        kept.append(line)
    return "\n".join([f"... ({len(text.encode())} bytes of traceback, cut{where})", *reversed(kept)])


def _log_call(call_id: str, method: str, target: str, code: grpc.StatusCode, seconds: float) -> None:
    """One line per call: ids, names, status and time only, never values or tokens."""
    fields = {
        "request_id": call_id,
        "method": method,
        "object": target,
        "status": code.name,
        "duration_ms": round(seconds * 1000, 3),
    }
    calls_log.info("call", extra={"fields": fields})


def error_metadata(error: DeploydError, message: str, call_id: str = "") -> tuple[tuple[str, bytes | str], ...]:
    """Trailing metadata that carries what a status code and message cannot; its traceback cut
    so that it and the message (as sent) fit METADATA_BUDGET together. call_id: the id the whole
    traceback is logged under, also sent as x-request-id."""
    killed_worker = isinstance(error, errors.WorkerCrashed) and error.caused_by_call
    if not (error.remote_type or error.remote_traceback or killed_worker):
        return ()
    # grpc-message is percent-encoded (3 bytes for each byte outside printable ASCII); a -bin
    # value is base64 (4 bytes for each 3).
    message_on_wire = sum(1 if 0x20 <= byte < 0x7F and byte != 0x25 else 3 for byte in message.encode())
    traceback_budget = max((METADATA_BUDGET - message_on_wire) * 3 // 4 - 200, 500)
    detail = pb.ErrorDetail(
        remote_type=_cut(error.remote_type, 200),
        remote_traceback=_cut_traceback(error.remote_traceback, traceback_budget, call_id),
        call_killed_worker=killed_worker,
    )
    metadata: tuple[tuple[str, bytes | str], ...] = ((ERROR_DETAIL_KEY, detail.SerializeToString()),)
    if killed_worker:
        metadata += ((RETRY_PUSHBACK_KEY, "-1"),)
    if call_id:
        metadata += ((REQUEST_ID_KEY, call_id),)
    return metadata


# ---------------------------------------------------------------------------- registration


class MalformedRequest(NamedTuple):
    """What a handler gets instead of a request whose bytes do not parse."""

    message_type: str  # the protobuf type the bytes should have been
    reason: str  # protobuf's own words

    def describe(self) -> str:
        for phrase, meaning in _DECODE_REASONS.items():
            if phrase in self.reason:
                return f"the request is not a valid {self.message_type}: {meaning}"
        return f"the request is not a valid {self.message_type}: {self.reason or 'its bytes are not protobuf'}"


# What protobuf's (upb's) decode errors mean, in terms a caller can act on.
_DECODE_REASONS = {
    "bad UTF-8": "a string field holds bytes that are not valid UTF-8 (send binary data as bytes)",
    "MaxDepth": "it nests messages deeper than protobuf's limit of 100 levels",
}


def _parse_or_mark(parse: Callable[[bytes], Any], message_type: str, metrics: Metrics) -> Callable[[bytes], Any]:
    def parse_request(data: bytes) -> Any:
        metrics.observe_received(len(data))
        try:
            return parse(data)
        except DecodeError as error:
            reason = str(error).partition(": ")[2] if ": " in str(error) else str(error)
            return MalformedRequest(message_type, reason)

    return parse_request


def _serialize_counted(serialize: Callable[[Any], bytes], metrics: Metrics) -> Callable[[Any], bytes]:
    def serialize_response(message: Any) -> bytes:
        data = serialize(message)
        metrics.observe_sent(len(data))
        return data

    return serialize_response


class _HandlerTable:
    """Stands in for a server to take the generated add_*_to_server's method table."""

    handlers: dict[str, Any]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers = handlers


def register_service(
    server: Any,
    servicer: Any,
    add_generated: Callable[[Any, Any], None],
    service: Any,
    metrics: Metrics,
    only: frozenset[str] | None = None,
) -> None:
    """Register a service (its descriptor) from its generated add_*_to_server, with tolerant
    parsing and byte counts. only: the methods to serve (others: UNIMPLEMENTED); None: all."""
    table = _HandlerTable()
    add_generated(servicer, table)
    handlers = {}
    for name, handler in table.handlers.items():
        if only is not None and name not in only:
            continue
        message_type = service.methods_by_name[name].input_type.full_name
        handlers[name] = handler._replace(
            request_deserializer=_parse_or_mark(handler.request_deserializer, message_type, metrics),
            response_serializer=_serialize_counted(handler.response_serializer, metrics),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
