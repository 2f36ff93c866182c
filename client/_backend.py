"""What the blocking client does its own way; client/aio/_backend.py is the asyncio twin.

The generated client/_manager.py and client/_sessions.py import these names where the asyncio
source imports its own (see client/aio/_backend.py): the same names, each waiting by blocking.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, TypeVar

import grpc

from client._errors import DeployError
from client._replicas import replicas_now as replicas_now
from client._requests import chunks_of_file
from deployd_wire.proto import deployd_pb2 as pb

if TYPE_CHECKING:
    from typing import TypeAlias

    from client._sessions import Obj

    Attribute: TypeAlias = Obj  # what `obj.name` is: the attribute itself

T = TypeVar("T")

Rpc = Callable[..., T]  # a stub's method: called, it returns its answer

channels = grpc  # insecure_channel, secure_channel
sleep = time.sleep
Lock = threading.Lock  # held while one caller asks the daemon where the workers are
file_chunks = chunks_of_file  # a package file as LoadPackage chunks, read as they are sent


def stat(path: Path) -> os.stat_result:
    return path.stat()


def request_stream(items: Iterable[T]) -> Iterator[T]:
    """Requests already in memory, as the stream a streaming call sends."""
    return iter(items)


def first_event(stream: Any) -> pb.SessionEvent:
    """The first message of an OpenSession stream (a grpc.RpcError passes through)."""
    event = next(stream, None)
    if event is None:
        raise DeployError(grpc.StatusCode.UNAVAILABLE, "the daemon ended the session before it opened")
    return event


class _Status(Protocol):
    def status(self) -> pb.StatusResponse: ...


class WorkerCount:
    """The manager's num_workers: a property here (the asyncio client's is a coroutine)."""

    @property
    def num_workers(self: _Status) -> int:
        return len(self.status().workers)


def attribute(obj: Obj, name: str) -> Obj:
    """What `obj.name` is: the attribute, fetched now (one step)."""
    return obj.attr(name)


def call_with_trailers(rpc: Any, request: Any, timeout: float | None, metadata: Any) -> tuple[Any, Any]:
    """One unary call's answer and its trailing metadata."""
    response, call = rpc.with_call(request, timeout=timeout, metadata=metadata)
    return response, call.trailing_metadata()
