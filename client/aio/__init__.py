"""deployd's asyncio client: the same API as `client`, each call a coroutine on grpc.aio.

async with AsyncInterpreterManager("127.0.0.1:50051") as manager:
    package = await manager.load_package("my_package.pt")
    model = await package.load_pickle("model", "model.pkl")
    output = await model(torch.ones(1, 1, 10, 10))

Errors, Retry, TLS and Batching are the blocking client's own (imported here too).
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
from client._retry import Retry
from client._tls import TLS
from client.aio._manager import AsyncInterpreterManager, AsyncPackage, AsyncReplicatedObj
from client.aio._sessions import AsyncInterpreterSession, AsyncObj, AsyncWorkerInstance

__all__ = [
    "TLS",
    "AsyncInterpreterManager",
    "AsyncInterpreterSession",
    "AsyncObj",
    "AsyncPackage",
    "AsyncReplicatedObj",
    "AsyncWorkerInstance",
    "Batching",
    "DeadlineExceededError",
    "DeployError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "RemoteError",
    "ResourceExhaustedError",
    "Retry",
    "UnauthenticatedError",
    "UnavailableError",
]
