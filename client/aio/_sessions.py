"""AsyncInterpreterSession and AsyncObj: client._sessions for asyncio. Requests and answers come
from client._requests, errors from client._errors: only the waiting differs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generator, Mapping, Sequence

import grpc

from client import _requests as requests
from client._errors import DeployError, translate_rpc_error
from client._proto import deployd_pb2 as pb
from client._retry import Retry

if TYPE_CHECKING:
    from client.aio._manager import AsyncInterpreterManager, AsyncReplicatedObj

_ONCE = Retry(attempts=1)  # a step is never sent twice (client._sessions)


class AsyncInterpreterSession:
    """client.InterpreterSession for asyncio: `async with await manager.acquire_one() as session`."""

    def __init__(self, manager: AsyncInterpreterManager) -> None:
        self.manager = manager
        self.id = ""
        self.worker = -1
        self.worker_pid = 0
        self.self: AsyncObj | None = None
        self._stream: Any = None
        self._closed = False

    async def _open(self, request: pb.OpenSessionRequest) -> AsyncInterpreterSession:
        # The stream is the session's lease (see client._sessions.InterpreterSession).
        self._stream = self.manager._sessions_stub.OpenSession(request, metadata=self.manager._metadata)
        try:
            event = await self._stream.read()
        except grpc.RpcError as error:
            raise translate_rpc_error(error) from None
        if event is grpc.aio.EOF:
            raise DeployError(grpc.StatusCode.UNAVAILABLE, "the daemon ended the session before it opened")
        self.id, self.worker, self.worker_pid = event.session_id, event.worker, event.worker_pid
        self.self = AsyncObj(self, event.self) if event.HasField("self") else None
        return self

    def __repr__(self) -> str:
        return f"<AsyncInterpreterSession {self.id} on worker {self.worker}>"

    async def __aenter__(self) -> AsyncInterpreterSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.step("CloseSession", pb.CloseSessionRequest(session_id=self.id))
        except DeployError:
            pass  # ended already: nothing is left to release
        finally:
            self._stream.cancel()

    async def step(self, rpc_name: str, request: Any) -> Any:
        return await self.manager.call(getattr(self.manager._sessions_stub, rpc_name), request, retry=_ONCE)

    async def global_(self, module: str, name: str) -> AsyncObj:
        return AsyncObj(self, await self.step("Global", pb.GlobalRequest(session_id=self.id, module=module, name=name)))

    async def from_value(self, value: Any) -> AsyncObj:
        return AsyncObj(self, await self.step("FromValue", requests.from_value_request(self.id, value)))

    async def from_movable(self, replicated: AsyncReplicatedObj) -> AsyncObj:
        request = pb.FromMovableRequest(session_id=self.id, object_id=replicated.id, version=replicated.pinned_version)
        return AsyncObj(self, await self.step("FromMovable", request))


class AsyncObj:
    """client.Obj for asyncio: every step awaited. `await obj(x)`; `await obj.weight` (or
    `await obj.attr("weight")`); `await obj.describe("x")` calls the method in one step."""

    def __init__(self, session: AsyncInterpreterSession, response: pb.ObjResponse) -> None:
        self.__dict__.update(session=session, id=response.obj_id, type_name=response.type_name)

    session: AsyncInterpreterSession
    id: int
    type_name: str

    def __deployd_ref__(self) -> tuple[str, int]:
        return self.session.id, self.id

    def __repr__(self) -> str:
        return f"<AsyncObj {self.id} ({self.type_name}) in session {self.session.id}>"

    async def __call__(self, *args: Any, **kwargs: Any) -> AsyncObj:
        return await self.call_method("", *args, **kwargs)

    async def call_kwargs(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> AsyncObj:
        return await self.call_method("", *args, **dict(kwargs or {}))

    async def call_method(self, name: str, /, *args: Any, **kwargs: Any) -> AsyncObj:
        request = requests.obj_call_request(self.session.id, self.id, name, args, kwargs)
        return AsyncObj(self.session, await self.session.step("Call", request))

    async def attr(self, name: str) -> AsyncObj:
        request = pb.ObjAttrRequest(session_id=self.session.id, obj_id=self.id, name=name)
        return AsyncObj(self.session, await self.session.step("Attr", request))

    def __getattr__(self, name: str) -> _Attribute:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Attribute(self, (name,))

    async def hasattr(self, name: str) -> bool:
        request = pb.ObjAttrRequest(session_id=self.session.id, obj_id=self.id, name=name)
        return bool((await self.session.step("HasAttr", request)).present)

    async def to_value(self) -> Any:
        request = pb.ObjRequest(session_id=self.session.id, obj_id=self.id)
        return requests.value_result(await self.session.step("ToValue", request))


class _Attribute:
    """obj.a.b before it is awaited or called. Awaited, it is the attribute (a step per name);
    called, the method call (the last name is called in one step: the bound method never
    becomes an object of the session). So `await obj.weight.data.fill_(0.5)` reads as in Python."""

    def __init__(self, obj: AsyncObj, names: tuple[str, ...]) -> None:
        self._obj = obj
        self._names = names

    def __getattr__(self, name: str) -> _Attribute:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Attribute(self._obj, (*self._names, name))

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
