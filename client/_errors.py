"""Errors the client raises. Every failure is a DeployError; its subclass says what went wrong.

    DeployError                 .code (grpc.StatusCode), .details (the daemon's message)
    ├── NotFoundError           NOT_FOUND: unknown package, object or method
    ├── InvalidArgumentError    INVALID_ARGUMENT: malformed package, missing module or pickle, bad value
    ├── PermissionDeniedError   PERMISSION_DENIED: a server path outside the package directory
    ├── UnavailableError        UNAVAILABLE: a worker died during the call, or the daemon is down;
    │                           .call_killed_worker: the call itself ended its worker
    ├── ResourceExhaustedError  RESOURCE_EXHAUSTED: too many calls already wait, or a package too large
    ├── DeadlineExceededError   DEADLINE_EXCEEDED: the call's timeout passed
    ├── FailedPreconditionError FAILED_PRECONDITION: not possible in this state, e.g. a change
    │                           sent through a target of several replicas (client._replicas)
    ├── UnauthenticatedError    UNAUTHENTICATED: no token, or one the daemon does not know
    ├── PermissionDeniedError   PERMISSION_DENIED (also): the token's role may not do this
    └── RemoteError             UNKNOWN: model code raised; .remote_type, .remote_traceback, and
                                .call_id: the daemon logs the whole traceback under it

`translate_rpc_error` is the one place where a grpc.RpcError becomes one of these.
"""

from __future__ import annotations

from typing import Any

import grpc

from deployd_wire.proto import deployd_pb2 as pb

ERROR_DETAIL_KEY = "deployd-error-detail-bin"
REQUEST_ID_KEY = "x-request-id"


class DeployError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        remote_type: str = "",
        remote_traceback: str = "",
        call_killed_worker: bool = False,
        call_id: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.call_killed_worker = call_killed_worker
        self.call_id = call_id


class NotFoundError(DeployError):
    pass


class InvalidArgumentError(DeployError):
    pass


class PermissionDeniedError(DeployError):
    pass


class UnavailableError(DeployError):
    pass


class DeadlineExceededError(DeployError):
    pass


class FailedPreconditionError(DeployError):
    pass


class ResourceExhaustedError(DeployError):
    pass


class UnauthenticatedError(DeployError):
    pass


class RemoteError(DeployError):
    """Model code raised an exception in a worker."""

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


_ERROR_FOR_CODE: dict[grpc.StatusCode, type[DeployError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNKNOWN: RemoteError,
}


def translate_rpc_error(error: grpc.RpcError) -> DeployError:
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    details: str = error.details() or ""  # type: ignore[attr-defined]
    detail = pb.ErrorDetail()
    call_id = ""
    metadata: Any = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    for key, value in metadata:
        if key == ERROR_DETAIL_KEY:
            detail.ParseFromString(value)
        elif key == REQUEST_ID_KEY:
            call_id = str(value)
    error_type = _ERROR_FOR_CODE.get(code, DeployError)
    return error_type(
        code,
        details,
        remote_type=detail.remote_type,
        remote_traceback=detail.remote_traceback,
        call_killed_worker=detail.call_killed_worker,
        call_id=call_id,
    )
