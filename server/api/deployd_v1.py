"""The deployd.v1 servicer: protobuf in, domain calls, protobuf out.

Domain errors become statuses, calls are counted and logged, and requests that do not parse
are answered INVALID_ARGUMENT by what every protocol shares (server.api.calls).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc
from server.api.calls import Context, MalformedRequest, ModelCalls, Servicer, call_handlers, register_service
from server.api.metrics import Metrics
from server.api.values import DEFAULT_LIMITS, ValueLimits, pack_value, unpack_value
from server.batching.batcher import BatchPolicy
from server.errors import InvalidArgument
from server.models.dataports import Endpoint, Exit
from server.models.names import NamedModel
from server.models.placement import Placement
from server.models.repository import ModelRepository, ReloadReport
from server.models.service import ModelService, StatusSnapshot
from server.models.sessions import Session

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Deployd"].full_name
# What an invoke token may call; anything else in the service needs admin (server.api.auth).
INVOKE_METHODS = frozenset({"Invoke", "HasAttr", "LoadText", "LoadBinary", "Status", "Endpoints"})
_LOADS = {"LoadPackage": "package", "LoadPickle": "pickle"}


def _object_of(request: Any) -> str:
    return str(getattr(request, "object_id", ""))


# Invoke and HasAttr carry their object (or model name) as a metrics label; others are few.
_reports_errors = call_handlers(
    _object_of, per_model=frozenset({"Invoke", "HasAttr"}), loads=_LOADS, service=SERVICE_NAME
)


class InvokeHandlers(Servicer):
    """Invoke and HasAttr: what the daemon serves and every worker's data port serves too."""

    _service: ModelCalls
    _value_limits: ValueLimits

    @_reports_errors
    async def Invoke(self, request: pb.InvokeRequest, context: Context) -> pb.InvokeResponse:
        buffers: list[Any] = []
        limits = self._value_limits
        args = [unpack_value(value, buffers, limits) for value in request.args]
        # A protobuf map has no order (upb's differs from process to process): by name, so a
        # model meets its kwargs in one order on every path, and of bad ones the same is named.
        kwargs = (
            {name: unpack_value(value, buffers, limits) for name, value in sorted(request.kwargs.items())}
            if request.kwargs  # most calls have none: sorting an empty map's items costs 0.7 us
            else {}
        )
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


class EndpointsSnapshot(NamedTuple):
    generation: int
    workers: list[Endpoint]
    # slot -> what clients should call there: names and object ids that serve and that worker
    # holds, but batched ones
    models: dict[int, list[str]]
    exits: list[Exit]  # the latest workers that ended, newest last


# The methods a worker's data port serves of this service (server.api.dataport).
DATA_PORT_METHODS = frozenset({"Invoke", "HasAttr"})


class DeploydServicer(InvokeHandlers, pb_grpc.DeploydServicer):  # type: ignore[misc]
    _service: ModelService

    def __init__(
        self,
        service: ModelService,
        metrics: Metrics,
        log_calls: bool = True,
        value_limits: ValueLimits = DEFAULT_LIMITS,
        repository: ModelRepository | None = None,
        reload: Callable[[], Awaitable[ReloadReport]] | None = None,
        sessions: Callable[[], list[Session]] = list,
        endpoints: Callable[[], EndpointsSnapshot] | None = None,
    ) -> None:
        """endpoints: where the workers serve calls themselves (pool.data_ports); None: nowhere."""
        self._endpoints = endpoints
        self._service = service
        self._metrics = metrics
        self._log_calls = log_calls
        self._value_limits = value_limits
        self._repository = repository
        self._reload = reload
        self._sessions = sessions

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
        batching = None
        if request.HasField("batching"):
            wire = request.batching
            batching = BatchPolicy(
                wire.max_batch_size, wire.max_queue_delay_ms, tuple(wire.preferred_batch_sizes)
            ).checked()
        placement = None
        if request.workers or request.worker_slots:
            placement = Placement(request.workers, tuple(sorted(request.worker_slots)))
        loaded = await self._service.load_pickle(
            request.package_id,
            request.module,
            request.file,
            request.name,
            batching,
            placement,
            device=request.device or "cpu",
        )
        return pb.LoadPickleResponse(object_id=loaded.object_id, name=loaded.name, version=loaded.version)

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
        now = time.monotonic()
        return pb.StatusResponse(
            workers=[
                pb.WorkerStatus(
                    index=w.index,
                    pid=w.pid,
                    state=w.state,
                    calls_served=w.calls_served,
                    restarts=w.restarts,
                    last_failure=w.last_failure,
                    gpu=w.gpu if w.gpu >= 0 else None,
                    gpu_memory_bytes=w.gpu_memory_bytes,
                    gpu_utilization_percent=w.gpu_utilization_percent,
                    **w.memory._asdict(),
                )
                for w in snapshot.workers
            ],
            packages=[pb.PackageStatus(package_id=p.package_id, size_bytes=p.size_bytes) for p in snapshot.packages],
            objects=[
                pb.ObjectStatus(
                    object_id=o.object_id,
                    package_id=o.package_id,
                    module=o.module,
                    file=o.file,
                    worker_slots=o.slots or (),
                    device=o.device,
                )
                for o in snapshot.objects
            ],
            modules=snapshot.modules,
            queued_calls=snapshot.queued_calls,
            models=[_model_status(model, snapshot) for model in snapshot.models] + self._failed_models(snapshot),
            sessions=[
                pb.SessionStatus(
                    session_id=session.id,
                    worker=session.worker,
                    objects=session.objects,
                    idle_seconds=0.0 if session.steps_running else now - session.last_used,
                    steps_running=session.steps_running,
                )
                for session in self._sessions()
            ],
        )

    def _failed_models(self, snapshot: StatusSnapshot) -> list[pb.ModelStatus]:
        if self._repository is None:
            return []
        loaded = {model.name for model in snapshot.models}
        return [
            pb.ModelStatus(name=name, error=why) for name, why in self._repository.errors.items() if name not in loaded
        ]

    @_reports_errors
    async def Endpoints(self, request: pb.EndpointsRequest, context: Context) -> pb.EndpointsResponse:
        if self._endpoints is None:
            return pb.EndpointsResponse()
        snapshot = self._endpoints()
        return pb.EndpointsResponse(
            generation=snapshot.generation,
            workers=[
                pb.WorkerEndpoint(
                    slot=point.slot,
                    address=point.address,
                    pid=point.pid,
                    generation=point.generation,
                    models=snapshot.models.get(point.slot, []),
                )
                for point in snapshot.workers
            ],
            exits=[
                pb.WorkerExit(
                    slot=gone.slot,
                    pid=gone.pid,
                    reason=gone.reason,
                    call_killed_worker=gone.call_killed_worker,
                    call_id=gone.call_id,
                )
                for gone in snapshot.exits
            ],
        )

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
        policy = snapshot.batching.get(object_id)
        batching = None
        if policy is not None:
            batching = pb.Batching(
                max_batch_size=policy.max_batch_size,
                max_queue_delay_ms=policy.max_queue_delay_ms,
                preferred_batch_sizes=policy.preferred_batch_sizes,
            )
        versions.append(
            pb.ModelVersionStatus(
                version=version,
                object_id=object_id,
                state="serving" if version == model.serving else "draining",
                calls_in_flight=snapshot.calls_in_flight.get(object_id, 0),
                package_id=record.package_id,
                module=record.module,
                file=record.file,
                batching=batching,
            )
        )
    serving = records.get(model.versions.get(model.serving, ""))
    slots = serving.slots if serving is not None and serving.slots is not None else ()
    return pb.ModelStatus(name=model.name, serving_version=model.serving, versions=versions, worker_slots=slots)


async def _chunks(first: pb.LoadPackageRequest, rest: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    yield first.chunk
    async for request in rest:
        if isinstance(request, MalformedRequest):
            raise InvalidArgument(request.describe())
        if request.WhichOneof("source") != "chunk":
            raise InvalidArgument("a LoadPackage stream of chunks may not also name a server_path")
        yield request.chunk


def add_to_server(servicer: InvokeHandlers, server: Any, metrics: Metrics, only: frozenset[str] | None = None) -> None:
    """Register the Deployd service: the generated table, with tolerant parsing and byte counts."""
    service = pb.DESCRIPTOR.services_by_name["Deployd"]
    register_service(server, servicer, pb_grpc.add_DeploydServicer_to_server, service, metrics, only)
