"""A worker's data port: the worker serves calls itself, and the daemon stays the control plane.

    client ──Invoke/HasAttr──────> worker's grpc.aio server ──> LocalModels ──> run(Invoke)
           ──ModelInfer/Ready/───>  the daemon's handlers,      name -> id      in this process,
             Metadata               auth, limits and errors     board row       on this thread
    daemon ──SetRoutes──────────> LocalModels: the names and ids this port serves
    daemon ──OpenDataPort───────> DataPort.open(): bind, then serve

It runs inside a worker process (server.app.worker_process), on the worker's event loop, and
model code runs on that loop's thread: one call at a time, as on the daemon path, and a
request of the daemon's (a load, an unload, a replay) never runs beside a call. The handlers
are the daemon's own (server.api.deployd_v1.InvokeHandlers, server.api.kserve_v2.InferHandlers)
over LocalModels instead of the daemon's service, so statuses, messages, error detail, limits,
metrics and call logs are the same on both paths. Each call is marked on the worker's row of
the call board (server.ipc.call_board), where the daemon sees calls in flight and hung ones,
and model code may ask whether its caller's deadline has passed (deployd_worker).

Imports no torch: the function that runs a request is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc

from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc
from deployd_wire.proto import grpc_predict_v2_pb2 as v2
from deployd_wire.proto import grpc_predict_v2_pb2_grpc as v2_grpc
from deployd_worker._call import Call, running
from server import tracing
from server.api import deployd_v1, kserve_v2
from server.api.auth import TokenAuth
from server.api.calls import Context
from server.api.kserve_calls import V2Calls
from server.api.metrics import Metrics
from server.api.tls import server_credentials
from server.api.values import DEFAULT_LIMITS, ValueLimits
from server.batching.batcher import Batcher, BatchObserver, BatchPolicy
from server.batching.batcher import Pool as BatchPool
from server.errors import InvalidArgument, NotFound, error_from_failure
from server.ipc import protocol
from server.ipc.call_board import WorkerRow, call_label
from server.models.entry import TensorSpec
from server.models.names import ModelNames, NamedModel
from server.pool.deadlines import caller_deadline_ns

_NO_OBSERVER = BatchObserver(lambda model, rows: None, lambda model, seconds: None)

# Trailing metadata of every answer: the endpoints generation the port was last told of. A
# client whose list of ports is older asks the daemon again (deployd.v1 Endpoints).
GENERATION_KEY = "deployd-endpoints-generation"

Run = Callable[[protocol.Request, list[Any]], tuple[protocol.Reply, list[Any]]]

# Our clients name each call (a random 63-bit id): if the worker dies running it, the daemon
# says so in Endpoints (WorkerExit.call_id), and the client does not send it again.
CALL_ID_KEY = "deployd-call-id"

# The id of the call a handler serves (0: none); its deadline is server.pool.deadlines'. Each
# grpc.aio call runs in a task of its own, so these are per call.
_call_id: contextvars.ContextVar[int] = contextvars.ContextVar("call_id", default=0)


class DataPortSettings(NamedTuple):
    """What every worker's data port needs, given by the daemon when it starts the worker."""

    host: str
    board: str  # the call board's segment name ("": none)
    admin_tokens: tuple[str, ...] = ()
    invoke_tokens: tuple[str, ...] = ()
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    max_message_bytes: int = 256 * 1024 * 1024
    value_limits: ValueLimits = DEFAULT_LIMITS
    log_calls: bool = True
    event_loop: str = "auto"
    max_queued_calls: int = 1000  # pool.max_queued_calls: calls a batcher may hold
    log_format: str = "plain"  # server.log_format
    log_level: int = 20  # the daemon's (INFO): the call lines of a data port are logged as the daemon's
    metrics_directory: str = ""  # where the call series go for the daemon's /metrics ("": nowhere)
    # The daemon's tracing section (server.app.config.TracingSection), which the worker's
    # process starts its own tracing from (server.app.worker_process); None: off.
    tracing: object = None


class LocalPool:
    """This worker, as a batcher (server.batching) sees a pool: one worker, free unless a call
    is on its way to the model. A call yields to the loop once before it runs, so requests that
    arrived meanwhile reach their handlers and line up behind it: a batcher joins them."""

    def __init__(self, run: Callable[[protocol.Request, list[Any]], tuple[Any, list[Any]]], max_queued: int) -> None:
        self._run = run
        self._calls = 0  # calls between their start and their answer
        self.max_queued_calls = max_queued
        self.release_listeners: set[Callable[[], None]] = set()

    def idle_count(self) -> int:
        return 0 if self._calls else 1

    async def call(
        self, message: protocol.Request, buffers: list[Any], on_start: Callable[[], None] | None = None
    ) -> tuple[Any, list[Any]]:
        self._calls += 1
        try:
            await asyncio.sleep(0)
            if on_start is not None:
                on_start()
            # A batch's tensors come as their callers' rows (protocol.Gathered), which a socket
            # writes end to end; here they are joined once into the tensor the model gets.
            joined = [b"".join(buffer.parts) if type(buffer) is protocol.Gathered else buffer for buffer in buffers]
            return self._run(message, joined)
        finally:
            self._calls -= 1
            for listener in list(self.release_listeners):
                listener()


class LocalModels:
    """What this worker serves by name and id, as the daemon last said (SetRoutes), and the
    calls on it: the models side of the handlers (server.api.calls.ModelCalls). A version with
    batching gets a batcher here, as on the daemon: calls that meet at this worker are joined."""

    def __init__(self, run: Run, row: WorkerRow | None, metrics: Metrics | None = None, max_queued: int = 1000) -> None:
        self.generation = 0
        # What every answer's trailing metadata says (GENERATION_KEY), made once per generation.
        self.trailer: tuple[tuple[str, str], ...] = ((GENERATION_KEY, "0"),)
        self.slot = -1  # the worker's, once its port opens (for its spans)
        self._pid = os.getpid()  # for its spans
        self._run_request = run
        self._row = row
        self._labels: dict[tuple[Any, str, Any], bytes] = {}  # call site -> its call board label
        self._names = ModelNames()
        self._objects: set[str] = set()
        self._signatures: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = {}
        self._batchers: dict[str, Batcher] = {}
        local = LocalPool(self._run, max_queued)
        self._pool = BatchPool(local.call, local.idle_count, local.max_queued_calls, local.release_listeners)
        self._observer = (
            BatchObserver(metrics.observe_batch, metrics.observe_batch_wait) if metrics is not None else _NO_OBSERVER
        )

    def set_routes(self, routes: protocol.SetRoutes) -> None:
        if routes.generation < self.generation:
            return  # two changes' tables crossed on the way: the newer one stands
        names = ModelNames()
        for name, (serving, versions) in routes.models.items():
            names.models[name] = NamedModel(name, dict(versions), serving, max(versions, default=0))
        self._names = names
        self._objects = set(routes.objects)
        self._signatures = {
            name: (_specs(inputs), _specs(outputs)) for name, (inputs, outputs) in routes.signatures.items()
        }
        for object_id, (size, delay, preferred) in routes.batching.items():
            if object_id not in self._batchers:
                label = next((name for name, model in names.models.items() if object_id in model.versions.values()), "")
                policy = BatchPolicy(size, delay, tuple(preferred))
                self._batchers[object_id] = Batcher(object_id, label, policy, self._pool, self._observer)
        self.generation = routes.generation
        self.trailer = ((GENERATION_KEY, str(routes.generation)),)

    async def retire(self, object_id: str, timeout: float = 30.0) -> None:
        """Before an object is unloaded here: the calls its batcher holds finish first."""
        batcher = self._batchers.pop(object_id, None)
        if batcher is None:
            return
        deadline = time.monotonic() + timeout
        while not batcher.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        batcher.close()

    async def invoke(
        self, target: str, version: int, method: str, args: list[Any], kwargs: dict[str, Any], buffers: list[Any]
    ) -> tuple[Any, list[Any]]:
        object_id = self._resolve(target, version)
        batcher = self._batchers.get(object_id)
        if batcher is not None:
            return await batcher.call(method, args, kwargs, buffers)
        return self._run(protocol.Invoke(object_id, method, args, kwargs), buffers)

    async def has_attr(self, target: str, version: int, name: str) -> bool:
        present, _ = self._run(protocol.HasAttr(self._resolve(target, version), name), [])
        return bool(present)

    def named_model(self, name: str) -> NamedModel:
        return self._names.named(name)

    def served_names(self) -> set[str]:
        return self._names.served()

    def has_workers(self, object_id: str) -> bool:
        return object_id in self._objects  # this worker serves, and holds it or not

    def declared(self, name: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        return self._signatures.get(name, ((), ()))

    def _resolve(self, target: str, version: int) -> str:
        # The daemon's rules and words (server.models.names), over the table it sent.
        object_id = self._names.resolve_target(target, version, self._objects)
        if object_id not in self._objects:  # a model placed on other workers (its name is known)
            raise NotFound(
                f"{target!r} is not loaded on worker {self.slot} (it is placed on other workers):"
                " call it through the daemon, or on a worker that Endpoints lists it for"
            )
        return object_id

    def _run(self, message: protocol.Request, buffers: list[Any]) -> tuple[Any, list[Any]]:
        row = self._row
        deadline = caller_deadline_ns.get()
        if row is not None:
            row.begin(deadline, _call_id.get(), self._label_of(message))
        try:
            # Model code may ask whether its caller is gone (deployd_worker): here, once the
            # deadline has passed. A cancellation reaches this worker's grpc only through the
            # event loop, which the model holds while it runs: it cannot be seen meanwhile.
            with tracing.model_run(self.slot, self._pid, getattr(message, "object_id", "")) as span:
                with running(Call(deadline)):
                    reply, out_buffers = self._run_request(message, buffers)
                ran = isinstance(reply, protocol.Result)
                tracing.set_status(span, "ok" if ran else "error", ran)
        except SystemExit as stop:
            # Model code ended the process (sys.exit(n); the runtime turns every Exception into
            # a Failure). grpc would swallow it in the call's task: end now with its code, the
            # row still marked, so the daemon names this call as the one that ended the worker,
            # as on the daemon path.
            os._exit(stop.code if isinstance(stop.code, int) else 1)
        if row is not None:
            row.end()
        if isinstance(reply, protocol.Failure):
            raise error_from_failure(reply)
        assert isinstance(reply, protocol.Result)
        return reply.value, out_buffers

    def _label_of(self, message: protocol.Request) -> bytes:
        """The call in the board's words ("Invoke", object id, method), made once per call site."""
        member = getattr(message, "method", None) or getattr(message, "name", "")
        key = (type(message), getattr(message, "object_id", ""), member)
        label = self._labels.get(key)
        if label is None:
            if len(self._labels) >= _LABELS_KEPT:
                self._labels.clear()
            label = self._labels[key] = call_label(type(message).__name__, key[1], str(member))
        return label


_LABELS_KEPT = 1024  # call sites whose board label is kept made


def _specs(wire: list[tuple[str, str, list[int]]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name, datatype, tuple(shape)) for name, datatype, shape in wire)


def _note_call(context: Context) -> None:
    """The call's id, for the call board (its deadline is noted by every handler: server.api.calls)."""
    for key, value in context.invocation_metadata() or ():
        if key == CALL_ID_KEY:
            with contextlib.suppress(ValueError):  # not one of ours: the call simply has no id
                _call_id.set(int(value) & _CALL_ID_MASK)
            break


_CALL_ID_MASK = (1 << 63) - 1  # a board word is a signed 64-bit integer


class DataPortV1(deployd_v1.InvokeHandlers, pb_grpc.DeploydServicer):  # type: ignore[misc]
    """deployd.v1's Invoke and HasAttr on a data port."""

    def __init__(self, models: LocalModels, metrics: Metrics, settings: DataPortSettings) -> None:
        self._service = models
        self._models = models
        self._metrics = metrics
        self._log_calls = settings.log_calls
        self._value_limits = settings.value_limits

    async def Invoke(self, request: pb.InvokeRequest, context: Context) -> pb.InvokeResponse:
        _note_call(context)
        response = await super().Invoke(request, context)
        context.set_trailing_metadata(self._models.trailer)
        return response

    async def HasAttr(self, request: pb.HasAttrRequest, context: Context) -> pb.HasAttrResponse:
        _note_call(context)
        response = await super().HasAttr(request, context)
        context.set_trailing_metadata(self._models.trailer)
        return response


class DataPortV2(kserve_v2.InferHandlers, v2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """KServe v2's health, metadata and inference on a data port."""

    def __init__(
        self, models: LocalModels, metrics: Metrics, settings: DataPortSettings, is_ready: Callable[[], bool]
    ) -> None:
        self._models = models
        self._calls = V2Calls(models, models.declared, is_ready, settings.value_limits)
        self._metrics = metrics
        self._log_calls = settings.log_calls
        self._value_limits = settings.value_limits

    async def ModelInfer(self, request: v2.ModelInferRequest, context: Context) -> v2.ModelInferResponse:
        _note_call(context)
        response = await super().ModelInfer(request, context)
        context.set_trailing_metadata(self._models.trailer)
        return response


class DataPort:
    """The worker's grpc.aio server: made when the daemon opens the port, never before (the
    worker is forked from a fork server that must never have run grpc)."""

    def __init__(self, settings: DataPortSettings, run: Run) -> None:
        self._settings = settings
        self._metrics = Metrics(settings.metrics_directory)
        self.models = LocalModels(run, None, self._metrics, settings.max_queued_calls)
        self._server: Any = None
        self._stopping = False

    async def open(self, request: protocol.OpenDataPort) -> int:
        """Bind (the port asked, 0: any) and serve; the port bound."""
        if self._server is not None:
            raise InvalidArgument("the data port is already open")
        settings = self._settings
        self.models.slot = request.slot
        if settings.board:
            self.models._row = WorkerRow(settings.board, request.slot)
        metrics = self._metrics
        interceptors = []
        if settings.admin_tokens or settings.invoke_tokens:
            methods = {
                deployd_v1.SERVICE_NAME: deployd_v1.INVOKE_METHODS,
                kserve_v2.SERVICE_NAME: kserve_v2.INVOKE_METHODS,
            }
            interceptors.append(TokenAuth(methods, settings.admin_tokens, settings.invoke_tokens, metrics))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # A slot's port is its own: a second worker must fail to bind it, not share it.
                ("grpc.so_reuseport", 0),
            ],
        )
        deployd_v1.add_to_server(
            DataPortV1(self.models, metrics, settings), server, metrics, deployd_v1.DATA_PORT_METHODS
        )
        v2_servicer = DataPortV2(self.models, metrics, settings, lambda: not self._stopping)
        kserve_v2.add_to_server(v2_servicer, server, metrics, kserve_v2.DATA_PORT_METHODS)
        address = f"{settings.host}:{request.port}"
        try:
            if settings.tls_cert_file:
                credentials = server_credentials(
                    settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
                )
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as error:
            raise InvalidArgument(f"cannot bind the data port {address}: {error}") from None
        if not port:
            raise InvalidArgument(f"cannot bind the data port {address}")
        await server.start()
        self._server = server
        return int(port)

    async def close(self, grace: float) -> None:
        """Stop taking calls; those in flight get grace seconds to finish."""
        self._stopping = True
        if self._server is not None:
            await self._server.stop(grace)
