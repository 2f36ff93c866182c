"""AsyncInterpreterManager, AsyncPackage and AsyncReplicatedObj: client._manager's API with each
call a coroutine on grpc.aio. Requests, answers, errors and retry decisions come from the same
modules as the blocking client's (client._requests, client._errors, client._replicas); only
the waiting differs, so the two cannot drift apart."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, TypeVar

import grpc
import grpc.aio

from client import _requests as requests
from client._batching import Batching
from client._errors import translate_rpc_error
from client._proto import deployd_pb2 as pb
from client._proto import deployd_pb2_grpc as pb_grpc
from client._replicas import distinct_hosts, dns_host_and_port, listed_addresses, refuse_change
from client._retry import Retry
from client._tls import TLS
from client.aio._sessions import AsyncInterpreterSession, AsyncObj

Response = TypeVar("Response")


class AsyncInterpreterManager:
    """client.InterpreterManager for asyncio: `async with AsyncInterpreterManager(target) as m`.

    Takes the same arguments. The channel belongs to the event loop it was made in: make the
    manager inside the loop that uses it (grpc.aio's rule)."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        retry: Retry | None = None,
        token: str | None = None,
        tls: TLS | None = None,
        load_balancing: str = "round_robin",
        max_message_bytes: int = requests.DEFAULT_MAX_MESSAGE_BYTES,
        chunk_bytes: int = requests.DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self._chunk_bytes = chunk_bytes
        self._metadata = requests.auth_metadata(token)
        options = requests.channel_options(max_message_bytes, load_balancing)
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            credentials = tls.channel_credentials()
            self._channel = grpc.aio.secure_channel(target, credentials, options=options + tls.channel_options())
        self._stub = pb_grpc.DeploydStub(self._channel)
        self._sessions_stub = pb_grpc.SessionsStub(self._channel)

    async def __aenter__(self) -> AsyncInterpreterManager:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def call(
        self, rpc: Callable[..., Any], request: Any, timeout: float | None = None, retry: Retry | None = None
    ) -> Any:
        """Run one RPC, turning a grpc.RpcError into a DeployError; retried as the policy says
        (a stream of requests is never retried: it cannot be sent twice)."""
        attempts = requests.Attempts(
            timeout if timeout is not None else self.timeout,
            retry if retry is not None else self.retry,
            resendable=not isinstance(request, AsyncIterator),
        )
        while True:
            try:
                return await rpc(request, timeout=attempts.remaining(), metadata=self._metadata)
            except grpc.RpcError as rpc_error:
                error = translate_rpc_error(rpc_error)
            await asyncio.sleep(attempts.pause_after(error))

    async def refuse_if_replicated(self, what: str) -> None:
        """Raise FailedPreconditionError when this manager's target reaches several daemons."""
        listed = listed_addresses(self.target)
        host_port = dns_host_and_port(self.target)
        replicas = 1
        if listed is not None:
            replicas = len(listed)
        elif host_port is not None:
            try:  # the loop's resolver: socket.getaddrinfo would block every other call
                addrinfo = await asyncio.get_running_loop().getaddrinfo(*host_port, type=socket.SOCK_STREAM)
                replicas = distinct_hosts(addrinfo)
            except OSError:
                pass  # unresolvable: the call itself will fail UNAVAILABLE, saying so
        refuse_change(self.target, what, replicas)

    # ------------------------------------------------------------------ C++ API

    async def load_package(
        self, path_or_bytes: str | os.PathLike[str] | bytes | None = None, *, server_path: str | None = None
    ) -> AsyncPackage:
        """Load a torch.package archive: a local file, its bytes, or a path on the daemon's host."""
        requests.check_package_source(path_or_bytes, server_path)
        await self.refuse_if_replicated("load_package")
        stream: AsyncIterator[pb.LoadPackageRequest]
        if server_path is not None:
            stream = _in_loop([pb.LoadPackageRequest(server_path=server_path)])
        elif isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            stream = _in_loop(requests.chunks_of_bytes(bytes(path_or_bytes), self._chunk_bytes))
        else:
            path = Path(path_or_bytes)  # type: ignore[arg-type]
            await asyncio.to_thread(path.stat)  # a missing file raises here, before any RPC
            stream = _from_disk(path, self._chunk_bytes)
        response = await self.call(self._stub.LoadPackage, stream)
        return AsyncPackage(self, response.package_id)

    def model(self, name: str, version: int = 0) -> AsyncReplicatedObj:
        """A handle to the model served under name (see InterpreterManager.model); no call is made here."""
        return AsyncReplicatedObj(self, name, version=version)

    async def register_module_source(self, name: str, src: str) -> None:
        await self.refuse_if_replicated("register_module_source")
        await self.call(self._stub.RegisterModuleSource, pb.RegisterModuleSourceRequest(name=name, source=src))

    async def reload(self) -> pb.ReloadResponse:
        await self.refuse_if_replicated("reload")
        return await self.call(self._stub.Reload, pb.ReloadRequest())

    async def status(self) -> pb.StatusResponse:
        return await self.call(self._stub.Status, pb.StatusRequest())

    async def num_workers(self) -> int:
        """A coroutine here (a property in the blocking client: a property cannot wait)."""
        return len((await self.status()).workers)

    async def acquire_one(self) -> AsyncInterpreterSession:
        """A session on the least loaded worker: `async with await manager.acquire_one() as session`."""
        return await AsyncInterpreterSession(self)._open(pb.OpenSessionRequest())

    async def all_instances(self) -> list[AsyncWorkerInstance]:
        return [AsyncWorkerInstance(self, worker.index) for worker in (await self.status()).workers]

    async def count_registered_module_sources(self) -> int:
        return len((await self.status()).modules)

    async def create_movable(
        self, obj: AsyncObj, session: AsyncInterpreterSession, *, name: str | None = None
    ) -> AsyncReplicatedObj:
        """See InterpreterManager.create_movable."""
        await self.refuse_if_replicated("create_movable")
        request = pb.CreateMovableRequest(session_id=session.id, name=name or "")
        request.obj.session_id, request.obj.obj_id = obj.__deployd_ref__()
        response = await self.call(self._sessions_stub.CreateMovable, request)
        handle = AsyncReplicatedObj(self, response.name or response.object_id)
        handle.object_id, handle.version, handle.package_id = response.object_id, response.version, response.package_id
        return handle


class AsyncWorkerInstance:
    """client.WorkerInstance for asyncio."""

    def __init__(self, manager: AsyncInterpreterManager, index: int) -> None:
        self.manager = manager
        self.index = index

    async def acquire_session(self) -> AsyncInterpreterSession:
        return await AsyncInterpreterSession(self.manager)._open(pb.OpenSessionRequest(worker=self.index))


async def _in_loop(items: Iterable[pb.LoadPackageRequest]) -> AsyncIterator[pb.LoadPackageRequest]:
    for item in items:
        yield item


async def _from_disk(path: Path, chunk_bytes: int) -> AsyncIterator[pb.LoadPackageRequest]:
    # Each read in a thread: a slow disk must not stall the other calls on this loop.
    with await asyncio.to_thread(open, path, "rb") as source:
        while chunk := await asyncio.to_thread(source.read, chunk_bytes):
            yield pb.LoadPackageRequest(chunk=chunk)


class AsyncPackage:
    """client.Package for asyncio."""

    def __init__(self, manager: AsyncInterpreterManager, package_id: str) -> None:
        self.manager = manager
        self.id = package_id

    def __repr__(self) -> str:
        return f"<AsyncPackage {self.id[:12]}>"

    async def load_pickle(
        self, module: str, file: str, *, name: str | None = None, batching: Batching | None = None
    ) -> AsyncReplicatedObj:
        """See Package.load_pickle."""
        request = requests.load_pickle_request(self.id, module, file, name, batching)
        response = await self.manager.call(self.manager._stub.LoadPickle, request)
        handle = AsyncReplicatedObj(self.manager, response.name or response.object_id)
        handle.object_id, handle.version = response.object_id, response.version
        return handle

    async def load_text(self, module: str, resource: str) -> str:
        request = requests.resource_request(self.id, module, resource)
        return (await self.manager.call(self.manager._stub.LoadText, request)).text  # type: ignore[no-any-return]

    async def load_binary(self, module: str, resource: str) -> bytes:
        request = requests.resource_request(self.id, module, resource)
        return (await self.manager.call(self.manager._stub.LoadBinary, request)).data  # type: ignore[no-any-return]

    async def acquire_session(self) -> AsyncInterpreterSession:
        """A session whose `self` is the package's importer in that worker."""
        return await AsyncInterpreterSession(self.manager)._open(pb.OpenSessionRequest(package_id=self.id))

    async def unload(self) -> list[str]:
        await self.manager.refuse_if_replicated("unload")
        request = pb.UnloadPackageRequest(package_id=self.id)
        return list((await self.manager.call(self.manager._stub.UnloadPackage, request)).object_ids)


class AsyncReplicatedObj:
    """client.ReplicatedObj for asyncio: `await obj(x)`, `await obj.call_method(name, ...)`."""

    def __init__(
        self,
        manager: AsyncInterpreterManager,
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
        self.package_id = ""  # set by create_movable
        self._timeout = timeout
        self._retry = retry

    def __repr__(self) -> str:
        return f"<AsyncReplicatedObj {self.id}{f' version {self.pinned_version}' if self.pinned_version else ''}>"

    def options(self, *, timeout: float | None = None, retry: Retry | None = None) -> AsyncReplicatedObj:
        """The same object with per-call options (None: the manager's)."""
        handle = AsyncReplicatedObj(self.manager, self.id, version=self.pinned_version, timeout=timeout, retry=retry)
        handle.object_id, handle.version = self.object_id, self.version
        return handle

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self.call_method("__call__", *args, **kwargs)

    async def call_method(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        request = requests.invoke_request(self.id, self.pinned_version, name, args, kwargs)
        response = await self.manager.call(self.manager._stub.Invoke, request, self._timeout, self._retry)
        return requests.invoke_result(response)

    async def acquire_session(self) -> AsyncInterpreterSession:
        """A session whose `self` is this object's replica in that worker."""
        request = pb.OpenSessionRequest(object_id=self.id, version=self.pinned_version)
        return await AsyncInterpreterSession(self.manager)._open(request)

    async def hasattr(self, name: str) -> bool:
        request = pb.HasAttrRequest(object_id=self.id, name=name, version=self.pinned_version)
        return (await self.manager.call(self.manager._stub.HasAttr, request, self._timeout, self._retry)).present  # type: ignore[no-any-return]

    async def unload(self) -> None:
        await self.manager.refuse_if_replicated("unload")
        await self.manager.call(self.manager._stub.UnloadObject, pb.UnloadObjectRequest(object_id=self.id))
