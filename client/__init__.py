"""deployd's Python client: torch::deploy's C++ API over gRPC.

with InterpreterManager("127.0.0.1:50051") as manager:
    model = manager.load_package("my_package.pt").load_pickle("model", "model.pkl")
    output = model(torch.ones(1, 1, 10, 10))
"""

from client._batching import Batching
from client._errors import (
    DeadlineExceededError,
    DeployError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RemoteError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from client._manager import InterpreterManager, Package, ReplicatedObj
from client._retry import Retry
from client._sessions import InterpreterSession, Obj, WorkerInstance
from client._tls import TLS

__all__ = [
    "TLS",
    "Batching",
    "DeadlineExceededError",
    "DeployError",
    "FailedPreconditionError",
    "InterpreterManager",
    "InterpreterSession",
    "InvalidArgumentError",
    "NotFoundError",
    "Obj",
    "Package",
    "PermissionDeniedError",
    "RemoteError",
    "ReplicatedObj",
    "ResourceExhaustedError",
    "Retry",
    "UnauthenticatedError",
    "UnavailableError",
    "WorkerInstance",
]
