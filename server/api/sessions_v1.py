"""The deployd.v1.Sessions servicer: torch::deploy's InterpreterSession and Obj over gRPC.

Protobuf in, steps of server.models.sessions out. Every method needs an admin token (a
session runs any Python). OpenSession is a stream that lives as long as its session: the
session ends when the stream does (the client cancels it, or the connection goes), and the
stream ends when the session does (closed, idle, its worker died, the daemon stops).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc
from server.api.calls import Context, Servicer, call_handlers, register_service
from server.api.metrics import Metrics
from server.api.values import DEFAULT_LIMITS, ValueLimits, pack_value, unpack_value
from server.errors import DeploydError, FailedPrecondition, InvalidArgument
from server.ipc import protocol
from server.models.sessions import ObjInfo, Session, Sessions

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Sessions"].full_name
INVOKE_METHODS: frozenset[str] = frozenset()  # admin only


def _session_of(request: Any) -> str:
    return str(getattr(request, "session_id", ""))


_reports_errors = call_handlers(_session_of)


class SessionsServicer(pb_grpc.SessionsServicer, Servicer):  # type: ignore[misc]
    def __init__(
        self, sessions: Sessions, metrics: Metrics, log_calls: bool = True, value_limits: ValueLimits = DEFAULT_LIMITS
    ) -> None:
        self._sessions = sessions
        self._metrics = metrics
        self._log_calls = log_calls
        self._value_limits = value_limits

    @_reports_errors
    async def OpenSession(self, request: pb.OpenSessionRequest, context: Context) -> AsyncIterator[pb.SessionEvent]:
        # A stream, counted when its one event leaves (the session is open) or it fails before.
        if request.object_id and request.package_id:
            raise InvalidArgument("a session's self is an object or a package, not both")
        wanted = request.worker if request.HasField("worker") else None
        session = await self._sessions.open(wanted, request.object_id, request.version)
        try:
            event = pb.SessionEvent(session_id=session.id, worker=session.worker, worker_pid=session.pid)
            if request.object_id or request.package_id:
                self_obj = await self._sessions.self_object(
                    session, request.object_id, request.version, request.package_id
                )
                event.self.CopyFrom(_obj(session, self_obj))
        except DeploydError as error:
            self._sessions.end(session, f"its self could not be made: {error}")
            raise
        try:
            yield event
            await session.done.wait()
        finally:
            # The client cancelled, or went away: either way nobody holds the session now.
            self._sessions.end(session, "its OpenSession stream ended (the client closed it, or went away)")

    @_reports_errors
    async def CloseSession(self, request: pb.CloseSessionRequest, context: Context) -> pb.CloseSessionResponse:
        self._sessions.end(self._sessions.get(request.session_id), "closed by its client")
        return pb.CloseSessionResponse()

    @_reports_errors
    async def Global(self, request: pb.GlobalRequest, context: Context) -> pb.ObjResponse:
        session = self._sessions.get(request.session_id)
        if not request.module or not request.name:
            raise InvalidArgument("Global needs a module and a name")
        made = await self._sessions.make(
            session, lambda number: protocol.SessionGlobal(session.id, number, request.module, request.name), []
        )
        return _obj(session, made)

    @_reports_errors
    async def FromValue(self, request: pb.FromValueRequest, context: Context) -> pb.ObjResponse:
        session = self._sessions.get(request.session_id)
        buffers: list[Any] = []
        value = self._unpack(session, request.value, buffers)
        made = await self._sessions.make(
            session, lambda number: protocol.SessionFromValue(session.id, number, value), buffers
        )
        return _obj(session, made)

    @_reports_errors
    async def FromMovable(self, request: pb.FromMovableRequest, context: Context) -> pb.ObjResponse:
        session = self._sessions.get(request.session_id)
        made = await self._sessions.self_object(session, request.object_id, request.version, "")
        return _obj(session, made)

    @_reports_errors
    async def Call(self, request: pb.ObjCallRequest, context: Context) -> pb.ObjResponse:
        session = self._sessions.get(request.session_id)
        target = self._sessions.check_object(session, session.id, request.obj_id)
        buffers: list[Any] = []
        args = [self._unpack(session, value, buffers) for value in request.args]
        kwargs = {name: self._unpack(session, value, buffers) for name, value in sorted(request.kwargs.items())}
        made = await self._sessions.make(
            session,
            lambda number: protocol.ObjCall(session.id, number, target, request.method, args, kwargs),
            buffers,
        )
        return _obj(session, made)

    @_reports_errors
    async def Attr(self, request: pb.ObjAttrRequest, context: Context) -> pb.ObjResponse:
        session = self._sessions.get(request.session_id)
        target = self._sessions.check_object(session, session.id, request.obj_id)
        made = await self._sessions.make(
            session, lambda number: protocol.ObjAttr(session.id, number, target, request.name), []
        )
        return _obj(session, made)

    @_reports_errors
    async def HasAttr(self, request: pb.ObjAttrRequest, context: Context) -> pb.HasAttrResponse:
        session = self._sessions.get(request.session_id)
        target = self._sessions.check_object(session, session.id, request.obj_id)
        present, _ = await self._sessions.step(session, protocol.ObjAttr(session.id, 0, target, request.name), [])
        return pb.HasAttrResponse(present=bool(present))

    @_reports_errors
    async def ToValue(self, request: pb.ObjRequest, context: Context) -> pb.ObjValueResponse:
        session = self._sessions.get(request.session_id)
        target = self._sessions.check_object(session, session.id, request.obj_id)
        value, buffers = await self._sessions.step(session, protocol.ObjToValue(session.id, target), [])
        response = pb.ObjValueResponse()
        pack_value(value, buffers, response.value)
        return response

    @_reports_errors
    async def CreateMovable(self, request: pb.CreateMovableRequest, context: Context) -> pb.CreateMovableResponse:
        session = self._sessions.get(request.session_id)
        if request.obj.session_id != session.id:
            # torch::deploy's own words (createMovable), then ours.
            raise FailedPrecondition(
                "Cannot create movable from an object that lives in different session"
                f" (the object is in session {request.obj.session_id!r}, the call names session {session.id!r})"
            )
        number = self._sessions.check_object(session, session.id, request.obj.obj_id)
        loaded, package_id = await self._sessions.create_movable(session, number, request.name)
        return pb.CreateMovableResponse(
            object_id=loaded.object_id, name=loaded.name, version=loaded.version, package_id=package_id
        )

    def _unpack(self, session: Session, value: pb.Value, buffers: list[Any]) -> Any:
        def number_of(ref: pb.ObjRef) -> int:
            return self._sessions.check_object(session, ref.session_id, ref.obj_id)

        return unpack_value(value, buffers, self._value_limits, number_of)


def _obj(session: Session, made: ObjInfo) -> pb.ObjResponse:
    return pb.ObjResponse(session_id=session.id, obj_id=made.number, type_name=made.type_name)


def add_to_server(servicer: SessionsServicer, server: Any, metrics: Metrics) -> None:
    service = pb.DESCRIPTOR.services_by_name["Sessions"]
    register_service(server, servicer, pb_grpc.add_SessionsServicer_to_server, service, metrics)
