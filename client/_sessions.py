# Generated from client/aio/_sessions.py by scripts/generate_sync_client.py (unasync): never edit it.
# Edit the asyncio source, then run `python scripts/generate_sync_client.py`.
"""InterpreterSession and Obj: torch::deploy's sessions over gRPC (service deployd.v1.Sessions).

A session holds one worker for a sequence of steps; every Obj it makes is a handle to a Python
object that stays in that worker until the session ends. Calls and attributes of an Obj give
Objs; `to_value()` brings one back. See the README's "Sessions and Objs".

Like client/aio/_manager.py, client/aio/_sessions.py is the one source of both clients:
client/_sessions.py is generated from it by scripts/generate_sync_client.py. What `obj.name`
is differs (client/aio/_backend.py, client/_backend.py): in the blocking client the attribute,
fetched at once; in the asyncio one an Attribute that is awaited (`await obj.weight`) or called
(`await obj.weight.data.fill_(0.5)`, the last name called in one step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import grpc

from client import _requests as requests
from client._errors import DeployError, translate_rpc_error
from client._retry import Retry
from deployd_wire.proto import deployd_pb2 as pb

from ._backend import attribute, first_event

if TYPE_CHECKING:
    from ._backend import Attribute
    from ._manager import InterpreterManager, ReplicatedObj

# A step is never sent twice: a step that failed UNAVAILABLE lost its worker, and its session with it.
_ONCE = Retry(attempts=1)


class InterpreterSession:
    """One worker, held for a sequence of steps (C++: torch::deploy::InterpreterSession).

    Made by manager.acquire_one(), instance.acquire_session(), package.acquire_session() and
    obj.acquire_session(), and used as a context manager: the session ends when the block does
    (or on close(), when the manager closes, after pool.session_idle_seconds without a call,
    or when its worker dies). `self` is the Obj the session was opened on (a ReplicatedObj's
    replica, a Package's importer), or None. `worker` and `worker_pid` say which worker it holds.
    """

    def __init__(self, manager: InterpreterManager, request: pb.OpenSessionRequest) -> None:
        self.manager = manager
        self.id = ""
        self.worker = -1
        self.worker_pid = 0
        self.self: Obj | None = None
        self._request = request
        self._stream: Any = None
        self._closed = False

    def _open(self) -> InterpreterSession:
        # The stream is the session's lease: while it is open the session lives, and cancelling
        # it (or losing the connection) ends the session on the daemon.
        self._stream = self.manager._sessions_stub.OpenSession(self._request, metadata=self.manager._metadata)
        try:
            event = first_event(self._stream)
        except grpc.RpcError as error:
            raise translate_rpc_error(error) from None
        self.id, self.worker, self.worker_pid = event.session_id, event.worker, event.worker_pid
        self.self = Obj(self, event.self) if event.HasField("self") else None
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} on worker {self.worker}>"

    def __enter__(self) -> InterpreterSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """End the session: its objects are released in the worker. Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self.step("CloseSession", pb.CloseSessionRequest(session_id=self.id))
        except DeployError:
            pass  # ended already (idle, its worker died, the daemon stopped): nothing is left to release
        finally:
            self._stream.cancel()

    def step(self, rpc_name: str, request: Any) -> Any:
        return self.manager.call(getattr(self.manager._sessions_stub, rpc_name), request, retry=_ONCE)

    # ------------------------------------------------------------------ C++ API

    def global_(self, module: str, name: str) -> Obj:
        """`from module import name` in the session's worker (C++: session.global(module, name))."""
        request = pb.GlobalRequest(session_id=self.id, module=module, name=name)
        return Obj(self, self.step("Global", request))

    def from_value(self, value: Any) -> Obj:
        """A value (tensors, lists, dicts, ...) as an object in the worker (C++: fromIValue)."""
        return Obj(self, self.step("FromValue", requests.from_value_request(self.id, value)))

    def from_movable(self, replicated: ReplicatedObj) -> Obj:
        """This worker's replica of a ReplicatedObj, as an Obj of this session (C++: fromMovable)."""
        request = pb.FromMovableRequest(session_id=self.id, object_id=replicated.id, version=replicated.pinned_version)
        return Obj(self, self.step("FromMovable", request))


class Obj:
    """A Python object living in a session's worker (C++: torch::deploy::Obj).

    obj(*args, **kwargs), obj.call_kwargs(args, kwargs), obj.call_method(name, ...),
    obj.attr(name) (or obj.name), obj.hasattr(name): each a step in the session, giving an Obj
    that stays in the worker. obj.to_value() brings it back as a value. Objs and values may both
    be arguments, but an Obj only within its own session.
    """

    def __init__(self, session: InterpreterSession, response: pb.ObjResponse) -> None:
        # Set through __dict__: __getattr__ below makes every other name a remote attribute.
        self.__dict__.update(session=session, id=response.obj_id, type_name=response.type_name)

    session: InterpreterSession
    id: int
    type_name: str

    def __deployd_ref__(self) -> tuple[str, int]:
        """What stands for this Obj in an argument (client._values.to_wire)."""
        return self.session.id, self.id

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} ({self.type_name}) in session {self.session.id}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Obj:
        """C++: operator() and callKwargs."""
        return self.call_method("", *args, **kwargs)

    def call_kwargs(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> Obj:
        """C++: callKwargs(args, kwargs)."""
        return self.call_method("", *args, **dict(kwargs or {}))

    def call_method(self, name: str, /, *args: Any, **kwargs: Any) -> Obj:
        """obj.name(*args, **kwargs) in one step ("" calls the object itself)."""
        request = requests.obj_call_request(self.session.id, self.id, name, args, kwargs)
        return Obj(self.session, self.session.step("Call", request))

    def attr(self, name: str) -> Obj:
        """C++: obj.attr(name)."""
        request = pb.ObjAttrRequest(session_id=self.session.id, obj_id=self.id, name=name)
        return Obj(self.session, self.session.step("Attr", request))

    def __getattr__(self, name: str) -> Attribute:
        if name.startswith("__"):  # Python's own protocols (copy, pickle, ...) are not remote
            raise AttributeError(name)
        return attribute(self, name)

    def hasattr(self, name: str) -> bool:
        request = pb.ObjAttrRequest(session_id=self.session.id, obj_id=self.id, name=name)
        response = self.session.step("HasAttr", request)
        return bool(response.present)

    def to_value(self) -> Any:
        """The object as a value (C++: toIValue); InvalidArgumentError naming its type if it has none."""
        request = pb.ObjRequest(session_id=self.session.id, obj_id=self.id)
        return requests.value_result(self.session.step("ToValue", request))


class WorkerInstance:
    """One worker slot (C++: an element of manager.allInstances()): acquire_session() holds it."""

    def __init__(self, manager: InterpreterManager, index: int) -> None:
        self.manager = manager
        self.index = index

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.index}>"

    def acquire_session(self) -> InterpreterSession:
        return InterpreterSession(self.manager, pb.OpenSessionRequest(worker=self.index))._open()
