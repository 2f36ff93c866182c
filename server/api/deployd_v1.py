"""The gRPC servicer: protobuf in, domain calls, protobuf out; domain errors become statuses.

This is the only module that knows both grpc and the service. STATUS_FOR_ERROR is the
one table from domain error to gRPC status code.

`add_to_server` registers the generated method table with two changes: a request that
does not parse reaches its handler as a MalformedRequest (so it fails INVALID_ARGUMENT,
counted and logged like any call, instead of grpc's bare UNKNOWN), and message bytes are
counted from the serialized bytes grpc already holds (never by serializing again).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from typing import Any, AsyncIterator, Awaitable, Callable, NamedTuple, TypeAlias, TypeVar

import grpc
from google.protobuf.message import DecodeError

from server import errors
from server.api.metrics import Metrics
from server.api.values import DEFAULT_LIMITS, ValueLimits, pack_value, unpack_value
from server.errors import DeploydError, InvalidArgument
from server.models.names import NamedModel
from server.models.repository import ModelRepository, ReloadReport
from server.models.service import ModelService, StatusSnapshot
from server.proto import deployd_pb2 as pb
from server.proto import deployd_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# grpc ships no type hints: a servicer context is typed as what it is to mypy, Any.
Context: TypeAlias = Any

ERROR_DETAIL_KEY = "deployd-error-detail-bin"
# gRPC's retry protocol: a negative pushback tells any gRPC client not to retry the call.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

# Most specific first: the first matching class decides.
STATUS_FOR_ERROR: list[tuple[type[DeploydError], grpc.StatusCode]] = [
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.PathNotAllowed, grpc.StatusCode.PERMISSION_DENIED),
    (errors.TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.WorkerCrashed, grpc.StatusCode.UNAVAILABLE),
    (errors.PoolClosed, grpc.StatusCode.UNAVAILABLE),
    (errors.ModelError, grpc.StatusCode.UNKNOWN),
]


def status_for(error: DeploydError) -> grpc.StatusCode:
    for error_type, code in STATUS_FOR_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])

REQUEST_ID_KEY = "x-request-id"
_LOADS = {"LoadPackage": "package", "LoadPickle": "pickle"}
# Calls labelled with their object in metrics (others are few; their series would outlive the object).
_PER_OBJECT = frozenset({"Invoke", "HasAttr"})
calls_log = logging.getLogger("deployd.calls")


def _reports_errors(handler: Handler) -> Handler:
    """Turn a domain error raised by a handler into its status, with remote details attached;
    count the call (status, duration, bytes) and log one line for it."""
    method = handler.__name__
    load_kind = _LOADS.get(method)

    @functools.wraps(handler)
    async def wrapper(self: DeploydServicer, request: Any, context: Context) -> Any:
        started = time.perf_counter()
        metrics = self._metrics
        metrics.calls_in_flight.inc()
        object_id = getattr(request, "object_id", "")
        metric_object = object_id if method in _PER_OBJECT else ""

        def finish(code: grpc.StatusCode) -> None:
            # Before the answer leaves, so a caller that has its answer finds it counted.
            seconds = time.perf_counter() - started
            metrics.calls_in_flight.dec()
            metrics.observe_call(method, metric_object, code.name, seconds)
            if load_kind is not None and code == grpc.StatusCode.OK:
                metrics.load_duration.labels(load_kind).observe(seconds)
            if self._log_calls:
                # Once the answer has left: the line costs the caller no latency.
                context.add_done_callback(lambda _: _log_call(context, method, object_id, code, seconds))

        try:
            if isinstance(request, MalformedRequest):
                raise InvalidArgument(request.describe())
            response = await handler(self, request, context)
        except DeploydError as error:
            code = status_for(error)
            context.set_trailing_metadata(_error_metadata(error))
            finish(code)
            await context.abort(code, str(error))
        except asyncio.CancelledError:
            finish(grpc.StatusCode.CANCELLED)
            raise
        except Exception as error:
            log.exception("internal error in %s", method)
            finish(grpc.StatusCode.INTERNAL)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")
        finish(grpc.StatusCode.OK)
        return response

    return wrapper  # type: ignore[return-value]


def _log_call(context: Context, method: str, object_id: str, code: grpc.StatusCode, seconds: float) -> None:
    """One line per call: ids, names, status and time only, never values or tokens."""
    request_id = ""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            request_id = str(value)[:64]
    fields = {
        "request_id": request_id or secrets.token_hex(6),
        "method": method,
        "object": object_id,
        "status": code.name,
        "duration_ms": round(seconds * 1000, 3),
    }
    calls_log.info("call", extra={"fields": fields})


def _error_metadata(error: DeploydError) -> tuple[tuple[str, bytes | str], ...]:
    """Trailing metadata that carries what a status code and message cannot."""
    killed_worker = isinstance(error, errors.WorkerCrashed) and error.caused_by_call
    if not (error.remote_type or error.remote_traceback or killed_worker):
        return ()
    detail = pb.ErrorDetail(
        remote_type=error.remote_type, remote_traceback=error.remote_traceback, call_killed_worker=killed_worker
    )
    metadata: tuple[tuple[str, bytes | str], ...] = ((ERROR_DETAIL_KEY, detail.SerializeToString()),)
    if killed_worker:
        metadata += ((RETRY_PUSHBACK_KEY, "-1"),)
    return metadata


class DeploydServicer(pb_grpc.DeploydServicer):  # type: ignore[misc]
    def __init__(
        self,
        service: ModelService,
        metrics: Metrics,
        log_calls: bool = True,
        value_limits: ValueLimits = DEFAULT_LIMITS,
        repository: ModelRepository | None = None,
        reload: Callable[[], Awaitable[ReloadReport]] | None = None,
    ) -> None:
        self._service = service
        self._metrics = metrics
        self._log_calls = log_calls
        self._value_limits = value_limits
        self._repository = repository
        self._reload = reload

    @_reports_errors
    async def LoadPackage(
        self, requests: AsyncIterator[pb.LoadPackageRequest], context: Context
    ) -> pb.LoadPackageResponse:
        stream = aiter(requests)
        first = await anext(stream, None)
        if first is None:
            raise InvalidArgument("LoadPackage needs a chunk or a server_path")
        if isinstance(first, MalformedRequest):
            raise InvalidArgument(first.describe())
        if first.WhichOneof("source") == "server_path":
            if await anext(stream, None) is not None:
                raise InvalidArgument("a server_path must be the only message of LoadPackage")
            record = await self._service.load_package_path(first.server_path)
        else:
            record = await self._service.load_package_stream(_chunks(first, stream))
        return pb.LoadPackageResponse(package_id=record.package_id, size_bytes=record.size_bytes)

    @_reports_errors
    async def LoadPickle(self, request: pb.LoadPickleRequest, context: Context) -> pb.LoadPickleResponse:
        loaded = await self._service.load_pickle(request.package_id, request.module, request.file, request.name)
        return pb.LoadPickleResponse(object_id=loaded.object_id, name=loaded.name, version=loaded.version)

    @_reports_errors
    async def Invoke(self, request: pb.InvokeRequest, context: Context) -> pb.InvokeResponse:
        buffers: list[Any] = []
        limits = self._value_limits
        args = [unpack_value(value, buffers, limits) for value in request.args]
        kwargs = {name: unpack_value(value, buffers, limits) for name, value in request.kwargs.items()}
        result, result_buffers = await self._service.invoke(
            request.object_id, request.version, request.method or "__call__", args, kwargs, buffers
        )
        response = pb.InvokeResponse()
        pack_value(result, result_buffers, response.result)
        return response

    @_reports_errors
    async def HasAttr(self, request: pb.HasAttrRequest, context: Context) -> pb.HasAttrResponse:
        return pb.HasAttrResponse(
            present=await self._service.has_attr(request.object_id, request.version, request.name)
        )

    @_reports_errors
    async def UnloadObject(self, request: pb.UnloadObjectRequest, context: Context) -> pb.UnloadObjectResponse:
        await self._service.unload_object(request.object_id)
        return pb.UnloadObjectResponse()

    @_reports_errors
    async def UnloadPackage(self, request: pb.UnloadPackageRequest, context: Context) -> pb.UnloadPackageResponse:
        return pb.UnloadPackageResponse(object_ids=await self._service.unload_package(request.package_id))

    @_reports_errors
    async def LoadText(self, request: pb.LoadResourceRequest, context: Context) -> pb.LoadTextResponse:
        text = await self._service.load_resource(request.package_id, request.module, request.resource, binary=False)
        return pb.LoadTextResponse(text=text)

    @_reports_errors
    async def LoadBinary(self, request: pb.LoadResourceRequest, context: Context) -> pb.LoadBinaryResponse:
        data = await self._service.load_resource(request.package_id, request.module, request.resource, binary=True)
        return pb.LoadBinaryResponse(data=data)

    @_reports_errors
    async def RegisterModuleSource(
        self, request: pb.RegisterModuleSourceRequest, context: Context
    ) -> pb.RegisterModuleSourceResponse:
        if not all(part.isidentifier() for part in request.name.split(".")):
            raise InvalidArgument(f"{request.name!r} is not a valid module name")
        await self._service.register_module(request.name, request.source)
        return pb.RegisterModuleSourceResponse()

    @_reports_errors
    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusResponse:
        snapshot = self._service.status()
        return pb.StatusResponse(
            workers=[
                pb.WorkerStatus(
                    index=w.index,
                    pid=w.pid,
                    state=w.state,
                    calls_served=w.calls_served,
                    restarts=w.restarts,
                    last_failure=w.last_failure,
                    **w.memory._asdict(),
                )
                for w in snapshot.workers
            ],
            packages=[pb.PackageStatus(package_id=p.package_id, size_bytes=p.size_bytes) for p in snapshot.packages],
            objects=[
                pb.ObjectStatus(object_id=o.object_id, package_id=o.package_id, module=o.module, file=o.file)
                for o in snapshot.objects
            ],
            modules=snapshot.modules,
            queued_calls=snapshot.queued_calls,
            models=[_model_status(model, snapshot) for model in snapshot.models] + self._failed_models(snapshot),
        )

    def _failed_models(self, snapshot: StatusSnapshot) -> list[pb.ModelStatus]:
        if self._repository is None:
            return []
        loaded = {model.name for model in snapshot.models}
        return [
            pb.ModelStatus(name=name, error=why) for name, why in self._repository.errors.items() if name not in loaded
        ]

    @_reports_errors
    async def Reload(self, request: pb.ReloadRequest, context: Context) -> pb.ReloadResponse:
        if self._reload is None:
            raise InvalidArgument("this daemon cannot reload its models")
        report = await self._reload()
        return pb.ReloadResponse(
            loaded=report.loaded,
            swapped=report.swapped,
            unloaded=report.unloaded,
            unchanged=report.unchanged,
            failed=[pb.ModelFailure(name=name, error=why) for name, why in report.failed.items()],
        )


def _model_status(model: NamedModel, snapshot: StatusSnapshot) -> pb.ModelStatus:
    records = {record.object_id: record for record in snapshot.objects}
    versions = []
    for version, object_id in model.versions.items():
        record = records[object_id]
        versions.append(
            pb.ModelVersionStatus(
                version=version,
                object_id=object_id,
                state="serving" if version == model.serving else "draining",
                calls_in_flight=snapshot.calls_in_flight.get(object_id, 0),
                package_id=record.package_id,
                module=record.module,
                file=record.file,
            )
        )
    return pb.ModelStatus(name=model.name, serving_version=model.serving, versions=versions)


async def _chunks(first: pb.LoadPackageRequest, rest: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    yield first.chunk
    async for request in rest:
        if isinstance(request, MalformedRequest):
            raise InvalidArgument(request.describe())
        if request.WhichOneof("source") != "chunk":
            raise InvalidArgument("a LoadPackage stream of chunks may not also name a server_path")
        yield request.chunk


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


def add_to_server(servicer: DeploydServicer, server: Any, metrics: Metrics) -> None:
    """Register the Deployd service: the generated table, with tolerant parsing and byte counts."""
    table = _HandlerTable()
    pb_grpc.add_DeploydServicer_to_server(servicer, table)
    service = pb.DESCRIPTOR.services_by_name["Deployd"]
    handlers = {}
    for name, handler in table.handlers.items():
        message_type = service.methods_by_name[name].input_type.full_name
        handlers[name] = handler._replace(
            request_deserializer=_parse_or_mark(handler.request_deserializer, message_type, metrics),
            response_serializer=_serialize_counted(handler.response_serializer, metrics),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
