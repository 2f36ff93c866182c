"""The requests the client sends and what it makes of the answers, for both the blocking
client (client._manager) and the asyncio one (client.aio): they differ only in how a call
waits, so everything else about a call lives here, once."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import grpc

from client._batching import Batching
from client._errors import DeployError, InvalidArgumentError
from client._retry import Retry
from deployd_wire.proto import deployd_pb2 as pb

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 1024 * 1024


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The token as call metadata (None: $DEPLOYD_TOKEN if set), so that it works over plaintext
    on loopback as well as over TLS."""
    token = token if token is not None else os.environ.get("DEPLOYD_TOKEN") or None
    return (("authorization", f"Bearer {token}"),) if token else ()


def channel_options(max_message_bytes: int, load_balancing: str) -> list[tuple[str, Any]]:
    # The policy goes in the service config the client gives itself, as any gRPC client in any
    # language can: with several addresses (an `ipv4:` list, a DNS name with several records)
    # round_robin spreads calls over every replica, where gRPC's default (pick_first) would
    # send them all to the first that answers.
    service_config = json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", service_config),
    ]


class Attempts:
    """One call's tries: the time left of its deadline, and whether, and after how long, it is
    sent again after a failure (a stream of requests never is: it cannot be sent twice)."""

    def __init__(self, timeout: float | None, retry: Retry | None, *, resendable: bool = True) -> None:
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._retry = retry if resendable else None
        self._number = 1

    def remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def pause_after(self, error: DeployError) -> float:
        """Seconds to wait before the next try; raises error when there is to be none."""
        if self._retry is None or not self._retry.should_retry(error, self._number):
            raise error
        pause = self._retry.backoff(self._number)
        if self._deadline is not None and time.monotonic() + pause >= self._deadline:
            raise error
        self._number += 1
        return pause


def check_package_source(path_or_bytes: object, server_path: str | None) -> None:
    if (path_or_bytes is None) == (server_path is None):
        raise TypeError("load_package takes a path or bytes, or server_path=, not both")


def chunks_of_bytes(data: bytes, chunk_bytes: int) -> Iterator[pb.LoadPackageRequest]:
    for start in range(0, max(len(data), 1), chunk_bytes):
        yield pb.LoadPackageRequest(chunk=data[start : start + chunk_bytes])


def chunks_of_file(path: Path, chunk_bytes: int) -> Iterator[pb.LoadPackageRequest]:
    with open(path, "rb") as source:  # opened on the first next(), before any chunk is sent
        yield from (pb.LoadPackageRequest(chunk=chunk) for chunk in iter(lambda: source.read(chunk_bytes), b""))


def load_pickle_request(
    package_id: str,
    module: str,
    file: str,
    name: str | None,
    batching: Batching | None,
    workers: int | Sequence[int] | None = None,
    device: str = "",
) -> pb.LoadPickleRequest:
    """workers: how many workers hold the object (the daemon picks them), or which worker
    slots; None: where the name's serving version is, else every worker. device: where it runs
    (cpu, cuda, cuda:N, auto; empty: cpu)."""
    request = pb.LoadPickleRequest(package_id=package_id, module=module, file=file, name=name or "", device=device)
    if isinstance(workers, int):
        if workers < 1:
            raise InvalidArgumentError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"workers must be at least 1 (or a list of worker slots), got {workers}",
            )
        request.workers = workers
    elif workers is not None:
        if not workers:
            raise InvalidArgumentError(
                grpc.StatusCode.INVALID_ARGUMENT, "workers: give at least one worker slot (or None: every worker)"
            )
        request.worker_slots.extend(workers)
    if batching is not None:
        request.batching.max_batch_size = batching.max_batch_size
        request.batching.max_queue_delay_ms = batching.max_queue_delay_ms
        request.batching.preferred_batch_sizes.extend(batching.preferred_batch_sizes)
    return request


def resource_request(package_id: str, module: str, resource: str) -> pb.LoadResourceRequest:
    return pb.LoadResourceRequest(package_id=package_id, module=module, resource=resource)


def invoke_request(
    object_id: str, version: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> pb.InvokeRequest:
    """The InvokeRequest for obj.method(*args, **kwargs); a value that cannot go is the
    caller's InvalidArgumentError, raised before anything is sent."""
    request = pb.InvokeRequest(object_id=object_id, method=method, version=version)
    _fill_arguments(request, args, kwargs)
    return request


def _fill_arguments(request: Any, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> None:
    """request.args and request.kwargs (Invoke's or a session's Call) from Python values."""
    # Values need torch; imported on the first call, so that `deployd health` and other
    # commands that send no tensors start in a tenth of a second instead of a second.
    from client._values import to_wire

    try:
        for arg in args:
            to_wire(arg, request.args.add())
        for key, value in kwargs.items():
            to_wire(value, request.kwargs[key])
    except (TypeError, ValueError) as error:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None


def invoke_result(response: pb.InvokeResponse) -> Any:
    from client._values import from_wire

    return from_wire(response.result)


def obj_call_request(
    session_id: str, obj_id: int, method: str, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]
) -> pb.ObjCallRequest:
    """The Sessions.Call request for obj(*args, **kwargs) or obj.method(...); arguments may be Objs."""
    request = pb.ObjCallRequest(session_id=session_id, obj_id=obj_id, method=method)
    _fill_arguments(request, args, kwargs)
    return request


def from_value_request(session_id: str, value: Any) -> pb.FromValueRequest:
    from client._values import to_wire

    request = pb.FromValueRequest(session_id=session_id)
    try:
        to_wire(value, request.value)
    except (TypeError, ValueError) as error:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
    return request


def value_result(response: pb.ObjValueResponse) -> Any:
    from client._values import from_wire

    return from_wire(response.value)
