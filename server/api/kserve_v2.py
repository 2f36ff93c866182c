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

import importlib.metadata
import json
from collections.abc import Callable
from typing import Any

from server.api.calls import Context, ModelCalls, Servicer, call_handlers, register_service
from server.api.kserve_tensors import (
    Signature,
    decode_inputs,
    fill_response,
    result_outputs,
    select_outputs,
)
from server.api.metrics import Metrics
from server.api.values import DEFAULT_LIMITS, ValueLimits
from server.errors import InvalidArgument, NotFound
from server.models.entry import EntryError, ModelEntry, TensorSpec, parse_entries
from server.models.repository import ModelRepository
from server.models.service import ModelService
from server.proto import grpc_predict_v2_pb2 as v2
from server.proto import grpc_predict_v2_pb2_grpc as v2_grpc

SERVICE_NAME = "inference.GRPCInferenceService"
PLATFORM = "pytorch_torch_package"
# What an invoke token may call; the model repository extension (index, load, unload) needs admin.
INVOKE_METHODS = frozenset({"ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer"})
_MAX_REMEMBERED = 1024  # models whose last call's signature is kept for ModelMetadata


def _model_of(request: Any) -> str:
    return str(getattr(request, "model_name", "") or getattr(request, "name", ""))


_handles_call = call_handlers(_model_of, per_model=frozenset({"ModelInfer"}), loads={"RepositoryModelLoad": "model"})


def _server_version() -> str:
    try:
        return importlib.metadata.version("deployd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class InferHandlers(Servicer):
    """Health, metadata and inference: what the daemon serves and every worker's data port
    serves too (server.api.dataport)."""

    _service: ModelCalls
    _value_limits: ValueLimits
    _is_ready: Callable[[], bool]
    # name -> (inputs, outputs) of its last successful call: metadata when none is declared
    _seen: dict[str, tuple[list[Signature], list[Signature]]]

    def _declared(self, name: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """The inputs and outputs a model's entry declares (none: ((), ()))."""
        raise NotImplementedError

    # ------------------------------------------------------------------ server

    @_handles_call
    async def ServerLive(self, request: v2.ServerLiveRequest, context: Context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    @_handles_call
    async def ServerReady(self, request: v2.ServerReadyRequest, context: Context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self._is_ready())

    @_handles_call
    async def ServerMetadata(self, request: v2.ServerMetadataRequest, context: Context) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name="deployd", version=_server_version(), extensions=["model_repository"])

    # ------------------------------------------------------------------ models

    @_handles_call
    async def ModelReady(self, request: v2.ModelReadyRequest, context: Context) -> v2.ModelReadyResponse:
        """Ready: the model (or the version asked) is loaded and a worker can serve it. An
        unknown model is not ready (not an error: a readiness probe asks before it loads)."""
        version = _version(request.version)
        try:
            model = self._service.named_model(request.name)
        except NotFound:
            return v2.ModelReadyResponse(ready=False)
        loaded = version in model.versions if version else bool(model.serving)
        return v2.ModelReadyResponse(ready=loaded and self._is_ready())

    @_handles_call
    async def ModelMetadata(self, request: v2.ModelMetadataRequest, context: Context) -> v2.ModelMetadataResponse:
        name = _required_name(request.name)
        version = _version(request.version)
        model = self._service.named_model(name)
        if version and version not in model.versions:
            loaded = ", ".join(map(str, model.versions))
            raise NotFound(f"model {name!r} has no version {version} (loaded: {loaded})")
        declared_inputs, declared_outputs = self._declared(name)
        inputs_seen, outputs_seen = self._seen.get(name, ([], []))
        return v2.ModelMetadataResponse(
            name=name,
            versions=[str(number) for number in model.versions],
            platform=PLATFORM,
            inputs=_tensor_metadata(declared_inputs, inputs_seen),
            outputs=_tensor_metadata(declared_outputs, outputs_seen),
        )

    @_handles_call
    async def ModelInfer(self, request: v2.ModelInferRequest, context: Context) -> v2.ModelInferResponse:
        name = _required_name(request.model_name)
        version = _version(request.model_version) or self._service.named_model(name).serving
        declared_inputs, declared_outputs = self._declared(name)
        decoded = decode_inputs(request, declared_inputs, self._value_limits)
        # Pinned to the version resolved above, so the answer names the version that ran it.
        result, buffers = await self._service.invoke(
            name, version, "__call__", decoded.args, decoded.kwargs, decoded.buffers
        )
        outputs = result_outputs(result, buffers, declared_outputs)
        outputs = select_outputs(outputs, [output.name for output in request.outputs])
        response = v2.ModelInferResponse(model_name=name, model_version=str(version), id=request.id)
        outputs_seen = fill_response(outputs, decoded.raw, response)
        self._remember(name, decoded.seen, outputs_seen)
        return response

    def _remember(self, name: str, inputs: list[Signature], outputs: list[Signature]) -> None:
        if name not in self._seen and len(self._seen) >= _MAX_REMEMBERED:
            served = self._service.served_names()
            for gone in [known for known in self._seen if known not in served]:
                del self._seen[gone]
            if len(self._seen) >= _MAX_REMEMBERED:
                return
        self._seen[name] = (inputs, outputs)


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
        self._service = service
        self._repository = repository
        self._metrics = metrics
        self._is_ready = is_ready
        self._log_calls = log_calls
        self._value_limits = value_limits
        # name -> (inputs, outputs) of its last successful call: metadata when none is declared
        self._seen = {}

    def _declared(self, name: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        entry = self._repository.entry(name)
        return (entry.inputs, entry.outputs) if entry else ((), ())

    # ------------------------------------------------------------------ model repository (admin)

    @_handles_call
    async def RepositoryIndex(self, request: v2.RepositoryIndexRequest, context: Context) -> v2.RepositoryIndexResponse:
        """Every model of the repository (the config's and those loaded by name since), with
        its state: READY (and its serving version) or UNAVAILABLE (and why)."""
        served = self._service.served_names()
        response = v2.RepositoryIndexResponse()
        listed = set()
        for entry in self._repository.entries:
            listed.add(entry.name)
            if entry.name in served:
                serving = self._service.named_model(entry.name).serving
                response.models.add(name=entry.name, version=str(serving), state="READY")
            elif not request.ready:
                why = self._repository.errors.get(entry.name, "not loaded")
                response.models.add(name=entry.name, state="UNAVAILABLE", reason=why)
        for name in sorted(served - listed):  # named at run time through deployd.v1
            serving = self._service.named_model(name).serving
            response.models.add(name=name, version=str(serving), state="READY")
        return response

    @_handles_call
    async def RepositoryModelLoad(
        self, request: v2.RepositoryModelLoadRequest, context: Context
    ) -> v2.RepositoryModelLoadResponse:
        """Load a model by name: its config entry, or the entry in the `config` parameter (JSON:
        package, pickle, and optionally inputs, outputs), as tritonclient's load_model(name,
        config=...) sends it."""
        name = _required_name(request.model_name)
        await self._repository.load_by_name(name, _entry_parameter(name, request.parameters))
        return v2.RepositoryModelLoadResponse()

    @_handles_call
    async def RepositoryModelUnload(
        self, request: v2.RepositoryModelUnloadRequest, context: Context
    ) -> v2.RepositoryModelUnloadResponse:
        await self._repository.unload_by_name(_required_name(request.model_name))
        return v2.RepositoryModelUnloadResponse()


def _required_name(name: str) -> str:
    if not name:
        raise InvalidArgument("the model name is empty")
    return name


def _version(text: str) -> int:
    """A v2 version string: empty (the serving version, 0) or a positive number."""
    if not text:
        return 0
    # Versions count up from 1: more than 18 digits is no version (and int() of thousands of
    # digits is refused by Python itself).
    if not (text.isascii() and text.isdigit()) or len(text) > 18 or int(text) == 0:
        raise InvalidArgument(f"model version {text[:64]!r} is not a positive number (empty: the serving version)")
    return int(text)


def _tensor_metadata(
    declared: tuple[TensorSpec, ...], seen: list[Signature]
) -> list[v2.ModelMetadataResponse.TensorMetadata]:
    if declared:
        return [
            v2.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            for spec in declared
        ]
    # Only what the last call showed: its names and datatypes; any size (-1) in each dimension.
    return [
        v2.ModelMetadataResponse.TensorMetadata(name=item.name, datatype=item.datatype, shape=[-1] * item.rank)
        for item in seen
    ]


def _entry_parameter(name: str, parameters: Any) -> ModelEntry | None:
    if "config" not in parameters:
        return None
    text = parameters["config"].string_param
    try:
        raw = json.loads(text)
    except ValueError as error:
        raise InvalidArgument(f"the config parameter is not JSON: {error}") from None
    if not isinstance(raw, dict):
        raise InvalidArgument('the config parameter must be a JSON object: {"package": ..., "pickle": "module:file"}')
    try:
        (entry,) = parse_entries([{**raw, "name": name}])
    except EntryError as error:
        raise InvalidArgument(f"the config parameter: {error}") from None
    return entry


def add_to_server(servicer: InferHandlers, server: Any, metrics: Metrics, only: frozenset[str] | None = None) -> None:
    """Register the v2 service: the generated table, with tolerant parsing and byte counts."""
    service = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    register_service(server, servicer, v2_grpc.add_GRPCInferenceServiceServicer_to_server, service, metrics, only)
