"""The daemon's domain errors. The servicer maps each to one gRPC status (server.api.deployd_v1).

DeploydError
├── NotFound            PackageNotFound, ObjectNotFound, and a missing method
├── InvalidArgument     InvalidPackage, InvalidValue, and a bad module, pickle or resource
├── PathNotAllowed      a server-side path outside the package directory
├── TooLarge            over a configured size or count limit (a package, packages or objects loaded,
│                       sessions open, objects in a session); DeviceOutOfMemory (a GPU's)
├── FailedPrecondition  not possible in this state: SessionEnded, an Obj of another session
├── WorkerCrashed       the worker died while serving the call (.caused_by_call: it ended itself)
├── Overloaded          too many calls already wait for a worker
├── PoolClosed          the daemon is shutting down
├── CallCancelled       model code stopped because its caller cancelled the call (deployd_worker)
│   └── DeadlineExceeded    ... because its caller's deadline passed
└── ModelError          model code raised; carries the remote type and traceback

RemoteTraceback is no error of the daemon's: it is how a worker's traceback is chained.
"""

from __future__ import annotations

from server.ipc import protocol


class DeploydError(Exception):
    """Base of every error the daemon reports to a caller. One that carries a worker's traceback
    has it as its __cause__ (a RemoteTraceback), as CPython's process pool chains its workers':
    a daemon-side traceback of it shows the model's frames first."""

    def __init__(self, message: str, *, remote_type: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        if remote_traceback:
            self.__cause__ = RemoteTraceback(remote_traceback)


class RemoteTraceback(Exception):
    """A traceback formatted in a worker, as the cause of the daemon-side error it led to."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


class NotFound(DeploydError):
    pass


class PackageNotFound(NotFound):
    def __init__(self, package_id: str) -> None:
        super().__init__(f"no package {package_id!r} is loaded")


class ObjectNotFound(NotFound):
    def __init__(self, object_id: str, why: str = "") -> None:
        super().__init__(f"no object {object_id!r} is loaded" + (f": {why}" if why else ""))


class InvalidArgument(DeploydError):
    pass


class InvalidPackage(InvalidArgument):
    pass


class InvalidValue(InvalidArgument):
    pass


class PathNotAllowed(DeploydError):
    pass


class TooLarge(DeploydError):
    pass


class DeviceOutOfMemory(TooLarge):
    """A model's device (a GPU) had no room for it, or for a call's tensors; the worker lives."""


class FailedPrecondition(DeploydError):
    pass


class SessionEnded(FailedPrecondition):
    def __init__(self, session_id: str, why: str) -> None:
        super().__init__(f"session {session_id!r} has ended: {why}")


class WorkerCrashed(DeploydError):
    """caused_by_call: the worker ended itself while running the call (it crashed, exited,
    or went over its memory limit), so running the same call again would likely kill
    another worker. False when something outside killed it: a retry is safe.
    started: False when the worker died before it began this request (it was queued behind
    another, or the worker was already gone): the request had no part in its end."""

    def __init__(self, message: str, *, caused_by_call: bool = False, started: bool = True) -> None:
        super().__init__(message)
        self.caused_by_call = caused_by_call and started
        self.started = started


class Overloaded(DeploydError):
    pass


class PoolClosed(DeploydError):
    def __init__(self) -> None:
        super().__init__("the daemon is shutting down")


class CallCancelled(DeploydError):
    """Model code stopped early because its caller was gone (deployd_worker.check()); the worker
    goes on serving. The caller has usually hung up already: this is what a log or a batch sees."""


class DeadlineExceeded(CallCancelled):
    pass


class ModelError(DeploydError):
    pass


_ERROR_FOR_FAILURE: dict[str, type[DeploydError]] = {
    protocol.FAILURE_MODEL_ERROR: ModelError,
    protocol.FAILURE_INVALID_ARGUMENT: InvalidArgument,
    protocol.FAILURE_NOT_FOUND: NotFound,
    protocol.FAILURE_CANCELLED: CallCancelled,
    protocol.FAILURE_DEADLINE_EXCEEDED: DeadlineExceeded,
    protocol.FAILURE_OUT_OF_MEMORY: DeviceOutOfMemory,
}


def error_from_failure(failure: protocol.Failure, context: str = "") -> DeploydError:
    """The domain error for a worker's Failure reply; context prefixes the message."""
    message = f"{failure.type_name}: {failure.message}" if failure.type_name else failure.message
    if context:
        message = f"{context}: {message}"
    error_type = _ERROR_FOR_FAILURE.get(failure.kind, DeploydError)
    return error_type(message, remote_type=failure.type_name, remote_traceback=failure.traceback)
