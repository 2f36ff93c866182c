"""KServe v2 / Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), beside
deployd.v1 on the same port: tritonclient, KServe's and MLServer's clients work unchanged.

A v2 model is a named model (config `models:`, or a name given at load); `model_version`
empty is its serving version, a number pins that version. ModelInfer turns the request's
tensors into the same packed arguments a deployd.v1 Invoke makes (server.api.kserve_tensors)
and calls the model through the same domain service, so a tensor takes the same route to the
worker (shared memory above the threshold, no pickles). The model repository extension
(RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) maps onto the model repository.

Knows grpc and the domain service, never deployd.v1's servicer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deployd_wire.proto import grpc_predict_v2_pb2 as v2
from deployd_wire.proto import grpc_predict_v2_pb2_grpc as v2_grpc
from server.api.calls import Context, Servicer, call_handlers, register_service
from server.api.kserve_calls import EXTENSIONS, SERVER_NAME, TensorMetadata, V2Calls, V2Repository, server_version
from server.api.kserve_tensors import fill_response, input_tensors
from server.api.metrics import Metrics
from server.api.values import DEFAULT_LIMITS, ValueLimits
from server.models.repository import ModelRepository
from server.models.service import ModelService

SERVICE_NAME = "inference.GRPCInferenceService"
# What an invoke token may call; the model repository extension (index, load, unload) needs admin.
INVOKE_METHODS = frozenset({"ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer"})


def _model_of(request: Any) -> str:
    return str(getattr(request, "model_name", "") or getattr(request, "name", ""))


_handles_call = call_handlers(
    _model_of, per_model=frozenset({"ModelInfer"}), loads={"RepositoryModelLoad": "model"}, service=SERVICE_NAME
)


class InferHandlers(Servicer):
    """Health, metadata and inference: what the daemon serves and every worker's data port
    serves too (server.api.dataport). The operations are KServe v2's own (server.api.kserve_calls),
    which HTTP's endpoint runs too: this translates protobuf to them and back."""

    _calls: V2Calls

    # ------------------------------------------------------------------ server

    @_handles_call
    async def ServerLive(self, request: v2.ServerLiveRequest, context: Context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    @_handles_call
    async def ServerReady(self, request: v2.ServerReadyRequest, context: Context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self._calls.is_ready())

    @_handles_call
    async def ServerMetadata(self, request: v2.ServerMetadataRequest, context: Context) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=list(EXTENSIONS))

    # ------------------------------------------------------------------ models

    @_handles_call
    async def ModelReady(self, request: v2.ModelReadyRequest, context: Context) -> v2.ModelReadyResponse:
        return v2.ModelReadyResponse(ready=self._calls.model_ready(request.name, request.version))

    @_handles_call
    async def ModelMetadata(self, request: v2.ModelMetadataRequest, context: Context) -> v2.ModelMetadataResponse:
        metadata = self._calls.model_metadata(request.name, request.version)
        return v2.ModelMetadataResponse(
            name=metadata.name,
            versions=metadata.versions,
            platform=metadata.platform,
            inputs=[_tensor_metadata(tensor) for tensor in metadata.inputs],
            outputs=[_tensor_metadata(tensor) for tensor in metadata.outputs],
        )

    @_handles_call
    async def ModelInfer(self, request: v2.ModelInferRequest, context: Context) -> v2.ModelInferResponse:
        name, version = self._calls.resolve(request.model_name, request.model_version)
        requested = [output.name for output in request.outputs]
        answer = await self._calls.infer(name, version, input_tensors(request), requested)
        response = v2.ModelInferResponse(
            model_name=answer.model_name, model_version=answer.model_version, id=request.id
        )
        fill_response(answer.outputs, answer.raw, response)
        return response


# The methods a worker's data port serves of this service.
DATA_PORT_METHODS = INVOKE_METHODS


class KServeV2Servicer(InferHandlers, v2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        service: ModelService,
        repository: ModelRepository,
        metrics: Metrics,
        is_ready: Callable[[], bool],
        log_calls: bool = True,
        value_limits: ValueLimits = DEFAULT_LIMITS,
    ) -> None:
        self._repository = V2Repository(service, repository)
        self._calls = V2Calls(service, self._repository.declared, is_ready, value_limits)
        self._metrics = metrics
        self._log_calls = log_calls
        self._value_limits = value_limits

    # ------------------------------------------------------------------ model repository (admin)

    @_handles_call
    async def RepositoryIndex(self, request: v2.RepositoryIndexRequest, context: Context) -> v2.RepositoryIndexResponse:
        response = v2.RepositoryIndexResponse()
        for entry in self._repository.index(request.ready):
            response.models.add(name=entry.name, version=entry.version, state=entry.state, reason=entry.reason)
        return response

    @_handles_call
    async def RepositoryModelLoad(
        self, request: v2.RepositoryModelLoadRequest, context: Context
    ) -> v2.RepositoryModelLoadResponse:
        config = request.parameters["config"].string_param if "config" in request.parameters else None
        await self._repository.load(request.model_name, config)
        return v2.RepositoryModelLoadResponse()

    @_handles_call
    async def RepositoryModelUnload(
        self, request: v2.RepositoryModelUnloadRequest, context: Context
    ) -> v2.RepositoryModelUnloadResponse:
        await self._repository.unload(request.model_name)
        return v2.RepositoryModelUnloadResponse()


def _tensor_metadata(tensor: TensorMetadata) -> v2.ModelMetadataResponse.TensorMetadata:
    return v2.ModelMetadataResponse.TensorMetadata(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)


def add_to_server(servicer: InferHandlers, server: Any, metrics: Metrics, only: frozenset[str] | None = None) -> None:
    """Register the v2 service: the generated table, with tolerant parsing and byte counts."""
    service = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    register_service(server, servicer, v2_grpc.add_GRPCInferenceServiceServicer_to_server, service, metrics, only)
