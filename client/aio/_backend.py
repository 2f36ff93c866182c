"""What the asyncio client does its own way; client/_backend.py is the blocking client's twin.

client/aio/_manager.py and client/aio/_sessions.py are the one source of both clients (the
blocking modules are generated from them by scripts/generate_sync_client.py, a token rewrite).
Where waiting is not merely `await` dropped, the difference lives here, behind the same names
in both twins: how a channel is made, how a call pauses, how a package file is read and
streamed, how a DNS name is resolved, how a session's first event is read, what `obj.name` is,
and whether `num_workers` is a property or a coroutine.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Generator, Iterable, Protocol, TypeVar

import grpc
import grpc.aio

from client._errors import DeployError
from client._replicas import distinct_hosts, dns_host_and_port, replicas_listed
from deployd_wire.proto import deployd_pb2 as pb

if TYPE_CHECKING:
    from client.aio._sessions import AsyncObj

T = TypeVar("T")

Rpc = Callable[..., Awaitable[T]]  # a stub's method: called, it is awaited for its answer

channels = grpc.aio  # insecure_channel, secure_channel: a channel of this event loop
sleep = asyncio.sleep
Lock = asyncio.Lock  # held while one caller asks the daemon where the workers are


async def stat(path: Path) -> os.stat_result:
    """path.stat() in a thread: a slow disk must not stall the other calls on this loop."""
    return await asyncio.to_thread(path.stat)


async def request_stream(items: Iterable[T]) -> AsyncIterator[T]:
    """Requests already in memory, as the stream a streaming call sends."""
    for item in items:
        yield item


async def file_chunks(path: Path, chunk_bytes: int) -> AsyncIterator[pb.LoadPackageRequest]:
    """A package file as LoadPackage chunks, each read in a thread (see stat)."""
    with await asyncio.to_thread(open, path, "rb") as source:
        while chunk := await asyncio.to_thread(source.read, chunk_bytes):
            yield pb.LoadPackageRequest(chunk=chunk)


async def replicas_now(target: str) -> int:
    """client._replicas.replicas_now through the loop's resolver: socket.getaddrinfo would block
    every other call on the loop."""
    host_port = dns_host_and_port(target)
    if host_port is None:
        return replicas_listed(target)
    try:
        return distinct_hosts(await asyncio.get_running_loop().getaddrinfo(*host_port, type=socket.SOCK_STREAM))
    except OSError:
        return 1  # unresolvable: the call itself will fail UNAVAILABLE, saying so


async def first_event(stream: Any) -> pb.SessionEvent:
    """The first message of an OpenSession stream (a grpc.RpcError passes through)."""
    event = await stream.read()
    if event is grpc.aio.EOF:
        raise DeployError(grpc.StatusCode.UNAVAILABLE, "the daemon ended the session before it opened")
    return event


class _Status(Protocol):
    async def status(self) -> pb.StatusResponse: ...


class WorkerCount:
    """The manager's num_workers: a coroutine here (the blocking client's is a property; a
    property cannot wait)."""

    async def num_workers(self: _Status) -> int:
        return len((await self.status()).workers)


def attribute(obj: AsyncObj, name: str) -> Attribute:
    """What `obj.name` is: an Attribute, awaited or called."""
    return Attribute(obj, (name,))


class Attribute:
    """obj.a.b before it is awaited or called. Awaited, it is the attribute (a step per name);
    called, the method call (the last name is called in one step: the bound method never
    becomes an object of the session). So `await obj.weight.data.fill_(0.5)` reads as in Python."""

    def __init__(self, obj: AsyncObj, names: tuple[str, ...]) -> None:
        self._obj = obj
        self._names = names

    def __getattr__(self, name: str) -> Attribute:
        if name.startswith("__"):
            raise AttributeError(name)
        return Attribute(self._obj, (*self._names, name))

    async def _resolve(self, names: tuple[str, ...]) -> AsyncObj:
        obj = self._obj
        for name in names:
            obj = await obj.attr(name)
        return obj

    def __await__(self) -> Generator[Any, None, AsyncObj]:
        return self._resolve(self._names).__await__()

    async def __call__(self, *args: Any, **kwargs: Any) -> AsyncObj:
        owner = await self._resolve(self._names[:-1])
        return await owner.call_method(self._names[-1], *args, **kwargs)


async def call_with_trailers(rpc: Any, request: Any, timeout: float | None, metadata: Any) -> tuple[Any, Any]:
    """One unary call's answer and its trailing metadata."""
    call = rpc(request, timeout=timeout, metadata=metadata)
    response = await call
    return response, await call.trailing_metadata()
