# Generated from client/aio/_manager.py by scripts/generate_sync_client.py (unasync): never edit it.
# Edit the asyncio source, then run `python scripts/generate_sync_client.py`.
"""InterpreterManager, Package and ReplicatedObj: torch::deploy's C++ API, over gRPC.

client/aio/_manager.py, the asyncio client (client.aio: every call a coroutine on grpc.aio),
is the one source of both Python clients: client/_manager.py, the blocking client, is generated
from it by scripts/generate_sync_client.py (unasync: `async` and `await` dropped, `Async` names
made plain; `make lint` checks that the generated copy is current). What truly differs between
the two (the channel, pauses, reading a package file, DNS, num_workers) is in
client/aio/_backend.py and its blocking twin client/_backend.py. Requests, answers, errors and
retry decisions come from client._requests, client._errors, client._retry and client._replicas.

Every RPC goes through `call`; those a model handle makes (Invoke, HasAttr) through
`call_object` first. That one method is where the direct path will go: the client asks
`Endpoints` (protos/deployd/v1/deployd.proto) where the workers listen and sends these calls
straight to the worker with the fewest calls in flight. Not done yet: the daemon answers
Endpoints empty, and every call goes through the daemon.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import grpc

from client import _requests as requests
from client._batching import Batching
from client._direct import (
    CALL_ID_KEY,
    DIRECT_ENV,
    Routes,
    Worker,
    direct_wanted,
    generation_in,
    lost_worker_error,
    never_reached,
    new_call_id,
)
from client._errors import translate_rpc_error
from client._replicas import refuse_change
from client._retry import Retry
from client._tls import TLS
from client._trace import TraceMetadata, trace_metadata_source
from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc

from ._backend import (
    Lock,
    Rpc,
    WorkerCount,
    call_with_trailers,
    channels,
    file_chunks,
    replicas_now,
    request_stream,
    sleep,
    stat,
)
from ._sessions import InterpreterSession, Obj, WorkerInstance

DEFAULT_MAX_MESSAGE_BYTES = requests.DEFAULT_MAX_MESSAGE_BYTES
DEFAULT_CHUNK_BYTES = requests.DEFAULT_CHUNK_BYTES

Response = TypeVar("Response")
log = logging.getLogger("deployd.client")
# How long a client whose call lost its worker waits for the daemon to record that worker's end.
_EXIT_POLLS = 20
# A direct call ended by its deadline or cancelled: its worker may still be running it.
_GIVEN_UP = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})
_EXIT_POLL_SECONDS = 0.05
_MAX_RESENT = 3  # a call that never started is sent again at most this often
_EXIT_POLLS_BEFORE_PID = 4  # polls that wait for the end naming the call before the worker's will do


class InterpreterManager(WorkerCount):
    """A connection to a deployd daemon (C++: torch::deploy::InterpreterManager), or to several
    replicas of one: an `ipv4:a:p,b:p` list or a `dns:///name:port` target spreads calls over
    all of them (load_balancing: the gRPC policy, round_robin unless told otherwise); changes
    (load_package, register_module_source, reload, unload) through such a target are refused,
    see client._replicas.

    timeout: default deadline in seconds for every call (None: no deadline).
    retry: default Retry policy for calls that failed with UNAVAILABLE (None: no retries).
    token: bearer token sent with every call (the daemon's auth.admin_tokens or
        auth.invoke_tokens); None: $DEPLOYD_TOKEN if set, else none.
    tls: connect with TLS (TLS(ca=...), plus cert= and key= for mutual TLS); None: plaintext.
    propagate_trace: send the current OpenTelemetry span's context (W3C traceparent) with each
        call to a model, so that the daemon's spans join the caller's trace; needs
        opentelemetry-api, imported only then.

    num_workers: the daemon's worker count; a property in the blocking client, a coroutine
    in the asyncio one (a property cannot wait). The asyncio manager's channel belongs to the
    event loop it was made in: make it inside the loop that uses it (grpc.aio's rule).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        retry: Retry | None = None,
        token: str | None = None,
        tls: TLS | None = None,
        load_balancing: str = "round_robin",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        direct: bool | None = None,
        propagate_trace: bool = False,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self._chunk_bytes = chunk_bytes
        self._metadata = requests.auth_metadata(token)
        self._trace_metadata: TraceMetadata | None = trace_metadata_source() if propagate_trace else None
        options = requests.channel_options(max_message_bytes, load_balancing)
        self._worker_options = requests.channel_options(max_message_bytes, "pick_first")
        self._tls = tls
        # Where the workers serve calls themselves (client._direct); asked of the daemon at the first call.
        self._routes = Routes(direct_wanted(direct, target))
        self._routes_lock = Lock()
        if tls is None:
            self._channel = channels.insecure_channel(target, options=options)
        else:
            credentials = tls.channel_credentials()
            self._channel = channels.secure_channel(target, credentials, options=options + tls.channel_options())
        self._stub = pb_grpc.DeploydStub(self._channel)
        self._sessions_stub = pb_grpc.SessionsStub(self._channel)

    def __enter__(self) -> InterpreterManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; the daemon ends every session opened through it (their streams end)."""
        for worker in self._routes.workers:
            worker.channel.close()
        self._routes.workers = []
        self._channel.close()

    def call(
        self, rpc: Rpc[Response], request: Any, timeout: float | None = None, retry: Retry | None = None
    ) -> Response:
        """Run one RPC, turning a grpc.RpcError into a DeployError; retried as the policy says
        (a stream of requests is never retried: it cannot be sent twice)."""
        attempts = requests.Attempts(
            timeout if timeout is not None else self.timeout,
            retry if retry is not None else self.retry,
            resendable=not isinstance(request, Iterator),
        )
        while True:
            try:
                return rpc(request, timeout=attempts.remaining(), metadata=self._call_metadata())
            except grpc.RpcError as rpc_error:
                error = translate_rpc_error(rpc_error)
            sleep(attempts.pause_after(error))

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of one call: the token, and the caller's span when propagate_trace."""
        if self._trace_metadata is None:
            return self._metadata
        return (*self._metadata, *self._trace_metadata())

    def call_object(
        self,
        rpc_name: str,
        request: pb.InvokeRequest | pb.HasAttrRequest,
        timeout: float | None = None,
        retry: Retry | None = None,
    ) -> Any:
        """A ReplicatedObj's own unary calls (rpc_name: "Invoke" or "HasAttr"): to the worker with
        the fewest calls in flight when the daemon offers data ports (client._direct), else through
        the daemon; retried as the policy says, a worker that cannot be reached skipped."""
        routes = self._routes
        if not routes.enabled:
            return self.call(getattr(self._stub, rpc_name), request, timeout, retry)
        attempts = requests.Attempts(
            timeout if timeout is not None else self.timeout,
            retry if retry is not None else self.retry,
            resendable=True,
        )
        unreachable: set[str] = set()
        resent = 0  # calls sent again because their worker ended before it started them
        misrouted = False  # a worker said it lacks the target, and the list was asked for again
        while True:
            routes.check_target(request.object_id)
            if routes.stale:
                with self._routes_lock:  # one caller asks; the others wait for its answer
                    if routes.stale:
                        self._refresh_routes()
            worker = routes.pick(unreachable, request.object_id)
            stub = self._stub if worker is None else worker.stub
            metadata = self._call_metadata()
            call_id = 0
            if worker is not None:
                worker.in_flight += 1
                call_id = new_call_id()
                metadata = (*metadata, (CALL_ID_KEY, str(call_id)))
            try:
                response, trailers = call_with_trailers(
                    getattr(stub, rpc_name), request, attempts.remaining(), metadata
                )
                if worker is not None:
                    routes.reached = True
                    routes.note_generation(generation_in(trailers))
                    worker.note_answer()
                return response
            except grpc.RpcError as rpc_error:
                if worker is not None:
                    if rpc_error.code() in _GIVEN_UP:
                        worker.note_abandoned()  # the worker may still be running it
                    elif rpc_error.code() != grpc.StatusCode.UNAVAILABLE:
                        worker.note_answer()  # an error, but from a worker free to send it
                if worker is not None and rpc_error.code() == grpc.StatusCode.NOT_FOUND and not misrouted:
                    # Nothing ran. If the list of ports is older than a hot swap or a move, the
                    # call goes again where the new one says; else the worker's answer stands.
                    misrouted = True
                    generation = routes.generation
                    with self._routes_lock:
                        self._refresh_routes()
                    if routes.generation != generation:
                        continue
                if worker is not None and rpc_error.code() == grpc.StatusCode.UNAVAILABLE:
                    routes.stale = True  # that worker went away: ask where the workers are now
                    if never_reached(rpc_error.details()):
                        unreachable.add(worker.address)
                        if not routes.reached and len(unreachable) >= len(routes.workers):
                            log.warning(
                                "deployd: the workers' data ports (%s) cannot be reached from here; calls go"
                                " through the daemon at %s (direct=False or %s=0 says so from the start)",
                                ", ".join(sorted(unreachable)),
                                self.target,
                                DIRECT_ENV,
                            )
                            routes.enabled = False
                        continue  # it never reached a worker: another may take it at once
                error = translate_rpc_error(rpc_error)
                if worker is not None and error.code == grpc.StatusCode.UNAVAILABLE:
                    # The worker went away under the call: the daemon says how (Endpoints'
                    # exits), in the daemon path's words; a call that ended it is not sent again.
                    gone = self._end_of(worker, call_id)
                    if gone is not None:
                        error = lost_worker_error(gone, call_id)
                        if gone.call_id != call_id and resent < _MAX_RESENT:
                            # It waited behind the call that ended the worker and never ran:
                            # sent again at once, as the daemon path requeues such a call.
                            resent += 1
                            continue
            finally:
                if worker is not None:
                    worker.in_flight -= 1
            sleep(attempts.pause_after(error))

    def _end_of(self, worker: Worker, call_id: int) -> pb.WorkerExit | None:
        """The daemon's record of the end of a worker a call lost; None if it has none within
        about a second (the worker lives: the connection dropped for another reason).

        The end that names the call is the one; else that of the worker the call was sent to,
        taken only after a few polls: when the list of ports was out of date, the call reached
        the replacement of that worker (on the same port), whose end is recorded a moment later."""
        for poll in range(_EXIT_POLLS):
            try:
                answer = self._stub.Endpoints(pb.EndpointsRequest(), timeout=10, metadata=self._metadata)
            except grpc.RpcError:
                return None
            for gone in answer.exits:
                if gone.call_id == call_id:
                    return gone
            if poll >= _EXIT_POLLS_BEFORE_PID:
                for gone in reversed(answer.exits):
                    if gone.pid == worker.pid:
                        return gone
            sleep(_EXIT_POLL_SECONDS)  # its end not recorded yet (or it lives: a GOAWAY, a drain)
        return None

    def _refresh_routes(self) -> None:
        """Ask the daemon where the workers serve calls now; keep channels to those still there."""
        routes = self._routes
        if routes.generation < 0 and replicas_now(self.target) > 1:
            # Several daemons behind one name (dns:///...): each would list only its own
            # workers, and the others would get none of these calls. The balancer spreads them.
            routes.enabled = False
            return
        try:
            answer = self._stub.Endpoints(pb.EndpointsRequest(), timeout=10, metadata=self._metadata)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                routes.enabled = False  # a daemon from before data ports: its path it is
            return  # none reachable now: this call goes through the daemon (or fails there)
        known = {worker.address: worker for worker in routes.workers}
        workers = []
        for endpoint in answer.workers:
            worker = known.pop(endpoint.address, None)
            if worker is None or worker.pid != endpoint.pid:
                if worker is not None:
                    known[endpoint.address] = worker  # a replacement on the same port: closed below
                worker = self._worker_channel(endpoint.address, endpoint.pid)
            worker.targets = set(endpoint.models)  # what that worker holds (a placed model: some only)
            workers.append(worker)
        for gone in known.values():
            gone.channel.close()
        routes.workers = workers
        routes.generation = answer.generation
        routes.targets = set().union(*(worker.targets for worker in workers))
        routes.refreshed_at = time.monotonic()
        routes.stale = False

    def _worker_channel(self, address: str, pid: int) -> Worker:
        if self._tls is None:
            channel = channels.insecure_channel(address, options=self._worker_options)
        else:
            credentials = self._tls.channel_credentials()
            options = self._worker_options + self._tls.channel_options()
            channel = channels.secure_channel(address, credentials, options=options)
        return Worker(address, pid, channel, pb_grpc.DeploydStub(channel))

    def refuse_if_replicated(self, what: str) -> None:
        """Raise FailedPreconditionError when this manager's target reaches several daemons."""
        refuse_change(self.target, what, replicas_now(self.target))

    # ------------------------------------------------------------------ C++ API

    def load_package(
        self, path_or_bytes: str | os.PathLike[str] | bytes | None = None, *, server_path: str | None = None
    ) -> Package:
        """Load a torch.package archive: a local file, its bytes, or a path on the daemon's host.
        A file is read as it is sent (on asyncio in a thread: a slow disk never stalls the loop)."""
        requests.check_package_source(path_or_bytes, server_path)
        self.refuse_if_replicated("load_package")
        stream: Iterator[pb.LoadPackageRequest]
        if server_path is not None:
            stream = request_stream([pb.LoadPackageRequest(server_path=server_path)])
        elif isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            stream = request_stream(requests.chunks_of_bytes(bytes(path_or_bytes), self._chunk_bytes))
        else:
            path = Path(path_or_bytes)  # type: ignore[arg-type]
            stat(path)  # a missing file raises here, before any RPC
            stream = file_chunks(path, self._chunk_bytes)
        response = self.call(self._stub.LoadPackage, stream)
        return Package(self, response.package_id)

    def model(self, name: str, version: int = 0) -> ReplicatedObj:
        """A handle to the model served under name: each call goes to the version serving at that
        moment, or to `version` while it is loaded. No call is made until the handle is used."""
        return ReplicatedObj(self, name, version=version)

    def register_module_source(self, name: str, src: str) -> None:
        """Make `import name` work in every worker, including workers started later."""
        self.refuse_if_replicated("register_module_source")
        self.call(self._stub.RegisterModuleSource, pb.RegisterModuleSourceRequest(name=name, source=src))

    def reload(self) -> pb.ReloadResponse:
        """Have the daemon re-read its config file's `models:` (as SIGHUP does); says what changed."""
        self.refuse_if_replicated("reload")
        return self.call(self._stub.Reload, pb.ReloadRequest())

    def status(self) -> pb.StatusResponse:
        """The daemon's workers, packages, objects and registered modules (through a target of
        several replicas: whichever replica the balancer picked)."""
        return self.call(self._stub.Status, pb.StatusRequest())

    def create_movable(self, obj: Obj, session: InterpreterSession, *, name: str | None = None) -> ReplicatedObj:
        """Replicate an object built in a session to every worker (C++: manager.createMovable(obj, &session)).

        It is exported with torch.package in its worker and loaded as a package of its own: its
        tensors are held once in shared memory, as a package's weights; replacement workers get
        it too. With a name it is served as that model's next version (see load_pickle)."""
        self.refuse_if_replicated("create_movable")
        request = pb.CreateMovableRequest(session_id=session.id, name=name or "")
        request.obj.session_id, request.obj.obj_id = obj.__deployd_ref__()
        response = self.call(self._sessions_stub.CreateMovable, request)
        handle = ReplicatedObj(self, response.name or response.object_id)
        handle.object_id, handle.version, handle.package_id = response.object_id, response.version, response.package_id
        return handle

    def acquire_one(self) -> InterpreterSession:
        """A session on the least loaded worker (C++: manager.acquireOne())."""
        return InterpreterSession(self, pb.OpenSessionRequest())._open()

    def all_instances(self) -> list[WorkerInstance]:
        """One handle per worker slot, each with acquire_session() (C++: manager.allInstances())."""
        status = self.status()
        return [WorkerInstance(self, worker.index) for worker in status.workers]

    def count_registered_module_sources(self) -> int:
        """C++: manager.countRegisteredModuleSources()."""
        status = self.status()
        return len(status.modules)


class Package:
    """A loaded torch.package archive (C++: torch::deploy::Package)."""

    def __init__(self, manager: InterpreterManager, package_id: str) -> None:
        self.manager = manager
        self.id = package_id

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id[:12]}>"

    def load_pickle(
        self,
        module: str,
        file: str,
        *,
        name: str | None = None,
        batching: Batching | None = None,
        workers: int | Sequence[int] | None = None,
        device: str = "",
    ) -> ReplicatedObj:
        """Unpickle an object on every worker and return a handle to its replicas.

        workers places it (README: Placement): an int, on that many workers the daemon picks; a
        list, on those worker slots; None, where the name's serving version is, else everywhere.
        Its calls go only to the workers holding it.

        With a name, the object is served as that model's next version (hot swap: new calls go
        to it at once, calls running on the old version finish there), and the handle follows
        the name; its `.version` says which version this load made. With batching (and a
        name), concurrent calls to it are joined into one model call along dim 0.

        device (README: GPUs): "cpu", "cuda", "cuda:N" or "auto"; empty: cpu. Its inputs go to
        the device in the worker, its results come back on the CPU."""
        request = requests.load_pickle_request(self.id, module, file, name, batching, workers, device)
        response = self.manager.call(self.manager._stub.LoadPickle, request)
        handle = ReplicatedObj(self.manager, response.name or response.object_id)
        handle.object_id, handle.version = response.object_id, response.version
        return handle

    def load_text(self, module: str, resource: str) -> str:
        request = requests.resource_request(self.id, module, resource)
        response = self.manager.call(self.manager._stub.LoadText, request)
        return response.text

    def load_binary(self, module: str, resource: str) -> bytes:
        request = requests.resource_request(self.id, module, resource)
        response = self.manager.call(self.manager._stub.LoadBinary, request)
        return response.data

    def acquire_session(self) -> InterpreterSession:
        """A session whose `self` is the package's importer in that worker (C++: package.acquireSession())."""
        return InterpreterSession(self.manager, pb.OpenSessionRequest(package_id=self.id))._open()

    def unload(self) -> list[str]:
        """Unload the package and every object loaded from it; returns those objects' ids."""
        self.manager.refuse_if_replicated("unload")
        request = pb.UnloadPackageRequest(package_id=self.id)
        response = self.manager.call(self.manager._stub.UnloadPackage, request)
        return list(response.object_ids)


class ReplicatedObj:
    """One object replicated on every worker; a call runs on a free worker (C++: ReplicatedObj).

    `id` is what calls name: an object id, or a model name; `pinned_version` (0: none) sends
    every call to that version of the name instead of the serving one. After load_pickle,
    `object_id` and `version` say what the load made (version 0 without a name).
    """

    def __init__(
        self,
        manager: InterpreterManager,
        object_id: str,
        *,
        version: int = 0,
        timeout: float | None = None,
        retry: Retry | None = None,
    ) -> None:
        self.manager = manager
        self.id = object_id
        self.pinned_version = version
        self.object_id = object_id
        self.version = version
        self.package_id = ""  # set by create_movable: the package made for the object
        self._timeout = timeout
        self._retry = retry

    def __repr__(self) -> str:
        pinned = f" version {self.pinned_version}" if self.pinned_version else ""
        return f"<{type(self).__name__} {self.id}{pinned}>"

    def options(self, *, timeout: float | None = None, retry: Retry | None = None) -> ReplicatedObj:
        """The same object with per-call options (None: the manager's), e.g. obj.options(timeout=1)(x)."""
        handle = ReplicatedObj(self.manager, self.id, version=self.pinned_version, timeout=timeout, retry=retry)
        handle.object_id, handle.version = self.object_id, self.version
        return handle

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """C++: operator() and callKwargs."""
        return self.call_method("__call__", *args, **kwargs)

    def call_method(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        request = requests.invoke_request(self.id, self.pinned_version, name, args, kwargs)
        response = self.manager.call_object("Invoke", request, self._timeout, self._retry)
        return requests.invoke_result(response)

    def acquire_session(self) -> InterpreterSession:
        """A session whose `self` is this object's replica in that worker (C++: obj.acquireSession())."""
        request = pb.OpenSessionRequest(object_id=self.id, version=self.pinned_version)
        return InterpreterSession(self.manager, request)._open()

    def hasattr(self, name: str) -> bool:
        request = pb.HasAttrRequest(object_id=self.id, name=name, version=self.pinned_version)
        response = self.manager.call_object("HasAttr", request, self._timeout, self._retry)
        return bool(response.present)

    def unload(self) -> None:
        self.manager.refuse_if_replicated("unload")
        self.manager.call(self.manager._stub.UnloadObject, pb.UnloadObjectRequest(object_id=self.id))
