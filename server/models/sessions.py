"""Sessions: one worker held for a sequence of steps, and the objects those steps leave there
(torch::deploy's InterpreterSession and Obj).

    open() ──> a worker slot (the least loaded, or the one asked for) ──> Session
    step(session, request) ──> dispatcher.call_on(that worker) ──> reply  (any number, any order)
    create_movable(session, obj) ──> ExportObj there ──> the archive loaded as a package,
        the object unpickled on every worker (ModelService): a ReplicatedObj
    end(session, why) ──> SessionClose to the worker: its objects are dropped
    WorkerExited(its worker) (supervisor event) ──> end(session, worker_died=True)

A session is an object scope, not a lock: each step waits for its worker like any call and
lets it go after, so other callers keep using the worker between steps, any number of
sessions may share one, and nested sessions in one thread cannot deadlock.

The daemon numbers a session's objects itself, so it can count them against the limit and
check an argument's session without asking the worker. A session ends when its client closes
it or its OpenSession stream ends (server.api.sessions_v1), after `idle_seconds` without a
step, when its worker dies (the worker took the objects with it), or when the daemon stops; a
later step fails naming which (ended_why keeps the last few thousand reasons).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from server.errors import FailedPrecondition, InvalidArgument, NotFound, SessionEnded, TooLarge, WorkerCrashed
from server.ipc import protocol
from server.models.names import check_name
from server.models.service import LoadedObject, ModelService
from server.pool.dispatcher import Dispatcher
from server.pool.events import WorkerEvent, WorkerExited
from server.pool.worker_handle import WorkerState

log = logging.getLogger(__name__)

_REMEMBERED_ENDINGS = 4096  # ended sessions whose reason a late step is still told


@dataclass
class Session:
    id: str
    worker: int  # the pool slot
    pid: int  # the worker in that slot when the session opened: a replacement is not it
    last_used: float = field(default_factory=time.monotonic)
    objects: int = 0  # objects it holds in the worker
    next_number: int = 1  # 0 is never an object (ObjAttr uses it for "only ask")
    steps_running: int = 0
    ended: str = ""  # why, once it has ended
    ended_by_worker_death: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ObjInfo:
    """What a step that made an object answers: its number in the session and its type."""

    __slots__ = ("number", "type_name")

    def __init__(self, number: int, type_name: str) -> None:
        self.number = number
        self.type_name = type_name


class Sessions:
    def __init__(
        self,
        dispatcher: Dispatcher,
        service: ModelService,
        slots: int,
        idle_seconds: float = 300.0,
        max_sessions: int = 1000,
        max_objects: int = 10000,
    ) -> None:
        self._dispatcher = dispatcher
        self._slots = slots  # the pool's size
        self._service = service
        self._idle_seconds = idle_seconds
        self._max_sessions = max_sessions
        self._max_objects = max_objects
        self._open: dict[str, Session] = {}
        self._ended_why: OrderedDict[str, tuple[str, bool]] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._idle_seconds > 0:
            self._reaper = asyncio.create_task(self._end_idle_sessions(), name="session-idle-reaper")

    # ------------------------------------------------------------------ lifecycle

    async def open(self, worker: int | None = None, object_id: str = "", version: int = 0) -> Session:
        """A session on `worker`, else on the least loaded; with object_id (its self), on a
        worker that holds it (a placed model: server.models.placement)."""
        if self._max_sessions and len(self._open) >= self._max_sessions:
            raise TooLarge(
                f"{len(self._open)} sessions are open, the limit (limits.max_sessions={self._max_sessions});"
                " close one first"
            )
        slots = self._service.slots_of(self._service.resolve(object_id, version)) if object_id else None
        slot, pid = self._pick_worker(worker, slots)
        session = Session(secrets.token_hex(8), slot, pid)
        self._open[session.id] = session
        log.info("session %s opened on worker %d (pid %d)", session.id, slot, pid)
        return session

    def _pick_worker(self, wanted: int | None, slots: tuple[int, ...] | None) -> tuple[int, int]:
        serving = self._dispatcher.serving_workers()
        if wanted is not None and slots is not None and wanted in range(self._slots) and wanted not in slots:
            raise InvalidArgument(
                f"worker {wanted} does not hold the session's object: it is placed on worker slots"
                f" {', '.join(map(str, slots))}"
            )
        if slots is not None:
            serving = [worker for worker in serving if worker[0] in slots]
        if wanted is not None:
            if not 0 <= wanted < self._slots:  # never there: no retry can help
                last = self._slots - 1
                raise InvalidArgument(f"there is no worker slot {wanted}: the pool has slots 0 to {last}")
            for slot, pid, _ in serving:
                if slot == wanted:
                    return slot, pid
            raise WorkerCrashed(f"worker {wanted} is not serving now (it is being replaced)", started=False)
        if not serving:
            raise WorkerCrashed("no worker is serving now", started=False)
        held = {slot: 0 for slot, _, _ in serving}
        for session in self._open.values():
            if session.worker in held:
                held[session.worker] += 1
        # Least loaded: fewest sessions held there, then free before busy, then the lowest slot.
        slot, pid, _ = min(serving, key=lambda worker: (held[worker[0]], worker[2] is not WorkerState.IDLE, worker[0]))
        return slot, pid

    def get(self, session_id: str) -> Session:
        """The open session of that id; SessionEnded (UNAVAILABLE if its worker died) or NotFound."""
        session = self._open.get(session_id)
        if session is not None:
            return session
        ended = self._ended_why.get(session_id)
        if ended is None:
            raise NotFound(f"no session {session_id!r}")
        why, by_worker_death = ended
        if by_worker_death:
            raise WorkerCrashed(f"session {session_id!r} has ended: {why}", started=False)
        raise SessionEnded(session_id, why)

    def end(self, session: Session, why: str, *, worker_died: bool = False) -> None:
        """End a session (once): its stream ends, later steps are told why, the worker drops its objects."""
        if session.ended:
            return
        session.ended = why
        session.ended_by_worker_death = worker_died
        session.done.set()
        self._open.pop(session.id, None)
        self._ended_why[session.id] = (why, worker_died)
        while len(self._ended_why) > _REMEMBERED_ENDINGS:
            self._ended_why.popitem(last=False)
        log.info("session %s ended: %s", session.id, why)
        if not worker_died and session.objects:
            self._in_background(self._release_objects(session))

    def end_all(self, why: str) -> None:
        for session in list(self._open.values()):
            self.end(session, why)

    async def close(self, timeout: float = 5.0) -> None:
        """At shutdown, after end_all: stop the reaper, wait a little for the releases under way
        (one queued behind a hung call would wait for it: the supervisor's stop ends both)."""
        if self._reaper is not None:
            self._reaper.cancel()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in late:
                task.cancel()

    async def _release_objects(self, session: Session) -> None:
        try:
            await self._dispatcher.call_on(session.worker, session.pid, protocol.SessionClose(session.id), [])
        except WorkerCrashed:
            pass  # the worker is gone, and its objects with it
        except Exception:  # a release that fails must not take the daemon down
            log.exception("releasing the objects of session %s", session.id)

    def on_worker_event(self, event: WorkerEvent) -> None:
        """The supervisor's events (subscribe this): sessions on a worker that exited end."""
        if not isinstance(event, WorkerExited):
            return
        slot, pid = event.worker.index, event.worker.pid
        for session in list(self._open.values()):
            if session.worker == slot and session.pid == pid:
                self.end(session, f"its worker {slot} (pid {pid}) died", worker_died=True)

    async def _end_idle_sessions(self) -> None:
        interval = min(max(self._idle_seconds / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for session in list(self._open.values()):
                if not session.steps_running and now - session.last_used > self._idle_seconds:
                    self.end(session, f"no call for {self._idle_seconds:g}s (pool.session_idle_seconds)")

    def _in_background(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ steps

    def check_object(self, session: Session, ref_session: str, number: int) -> int:
        """An Obj passed as an argument of a step in `session`: the number it has there."""
        if ref_session != session.id:
            raise FailedPrecondition(
                f"an Obj of session {ref_session!r} was passed to session {session.id!r}: an object lives in"
                " its own session's worker only (pass it as a value, or make it in this session)"
            )
        if not 0 < number < session.next_number:
            raise NotFound(f"no object {number} in session {session.id!r}")
        return number

    async def make(self, session: Session, request_for: Any, buffers: list[Any]) -> ObjInfo:
        """Run a step that makes an object; request_for(number) builds it."""
        if self._max_objects and session.objects >= self._max_objects:
            raise TooLarge(
                f"session {session.id!r} holds {session.objects} objects, the limit"
                f" (limits.max_session_objects={self._max_objects}); end the session to free them"
            )
        number = session.next_number
        session.next_number += 1
        type_name, _ = await self.step(session, request_for(number), buffers)
        session.objects += 1
        return ObjInfo(number, str(type_name))

    async def step(self, session: Session, request: protocol.Request, buffers: list[Any]) -> tuple[Any, list[Any]]:
        """Run one request on the session's worker, waiting for it while it is busy."""
        self.get(session.id)  # ended meanwhile: say why
        session.steps_running += 1
        try:
            return await self._dispatcher.call_on(session.worker, session.pid, request, buffers)
        except WorkerCrashed:
            if session.ended_by_worker_death:
                raise WorkerCrashed(f"session {session.id!r} has ended: {session.ended}") from None
            raise
        finally:
            session.steps_running -= 1
            session.last_used = time.monotonic()

    async def self_object(self, session: Session, object_id: str, version: int, package_id: str) -> ObjInfo:
        """The session worker's replica of an object or model, or its importer of a package, as an Obj."""
        if package_id:
            self._service.require_package(package_id)
            resolved = ""
        else:
            resolved = self._service.resolve(object_id, version)
        return await self.make(
            session, lambda number: protocol.SessionFromObject(session.id, number, resolved, package_id), []
        )

    async def create_movable(self, session: Session, number: int, name: str) -> tuple[LoadedObject, str]:
        """Replicate an object of the session to every worker (createMovable): exported with
        torch.package in the session's worker, loaded back as a package of its own (its tensors
        staged into shared memory once, mapped copy-on-write by every replica), then unpickled
        everywhere; replacement workers get it by replay like any loaded object. The package
        goes with the object's last version. Returns the object and its package's id."""
        if name:
            check_name(name)  # before the export, which may be large
        archive, buffers = await self.step(session, protocol.ExportObj(session.id, number), [])
        _, _, _, index = archive  # a packed uint8 tensor: the archive's bytes are buffers[index]
        data = bytes(buffers[index])  # its own copy: the buffer may lie in an arena the next reply reuses
        del buffers

        async def one_chunk() -> Any:
            yield data

        record = await self._service.load_package_stream(one_chunk())
        try:
            loaded = await self._service.load_pickle(
                record.package_id, protocol.MOVABLE_MODULE, protocol.MOVABLE_FILE, name
            )
        finally:
            await self._service.release_package_when_unused(record.package_id)
        return loaded, record.package_id

    @property
    def open_count(self) -> int:
        return len(self._open)

    def snapshot(self) -> list[Session]:
        return sorted(self._open.values(), key=lambda session: session.id)
