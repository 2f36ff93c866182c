"""The daemon's end of one worker process: the process, its channel, its requests in flight.

A handle lives from spawn to exit. Its lifecycle task reads replies until the channel
closes or the process exits, then fails every request still waiting with
WorkerCrashed (naming the exit code or signal) and tells the supervisor
(server.pool.supervisor), which decides whether to replace the worker.

    starting ──(prepared; the supervisor)──> idle <──(a call; the dispatcher)──> busy
    any of them ──(the process ends; its lifecycle task)──> stopped

A request carries its caller's deadline (server.pool.deadlines); when its caller gives up
(abandon), its id goes on the worker's word of the cancel board (server.ipc.cancel_board),
where model code that asks (deployd_worker.cancelled()) sees it and can stop early.

A worker stuck in a call (kill_hung) is asked for its stacks first: DUMP_STACKS_SIGNAL, on
which its faulthandler writes every thread's Python stack to the daemon's stderr (its log);
STACK_DUMP_SECONDS later, SIGKILL.

What the worker prints (its fds 1 and 2) comes through a pipe of its own, read from spawn to
exit by an OutputReader (server.pool.worker_output), which tags each line with running_call().
A worker that cannot boot says why instead of greeting (BootFailed): spawn raises
WorkerCrashed with that reason.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_sentinels
from multiprocessing.context import BaseContext
from typing import Any, Callable, NamedTuple, NoReturn

from server.errors import WorkerCrashed, error_from_failure
from server.ipc import protocol
from server.ipc.cancel_board import CancelBoard
from server.ipc.shm import Arena
from server.pool.deadlines import caller_deadline_ns
from server.pool.object_labels import object_label
from server.pool.worker_output import OutputReader, RunningCall, open_pipe
from server.worker.entry import DUMP_STACKS_SIGNAL, WorkerSettings, run_worker

log = logging.getLogger(__name__)

# How long a dead worker's channel may keep delivering replies it wrote before dying.
_DRAIN_SECONDS = 1.0

# How long a hung worker gets to write its stacks to the log before it is killed.
STACK_DUMP_SECONDS = 0.5

# A forkserver child's exit code can be read from its sentinel once: the thread that reads
# second gets EOF, and multiprocessing records 255 over the real code. Process.start polls
# every live child (multiprocessing.process._cleanup) on the thread that calls it, the
# executor's, while the loop reaps the ones that ended; so both go through this lock.
_POLLING_CHILDREN = threading.Lock()


def start_child(process: Any) -> None:
    with _POLLING_CHILDREN:
        process.start()


def exit_code_of(process: Any, timeout: float) -> int | None:
    """The process's exit code once it ends (None if it runs past timeout); on a thread."""
    wait_for_sentinels([process.sentinel], timeout)
    with _POLLING_CHILDREN:
        process.join(0)
    return process.exitcode


def release(process: Any) -> None:
    """Close a process that has ended: its sentinel and the fork server's pipe to it (two fds) go
    now, rather than whenever the garbage collector finds the last reference to it."""
    with _POLLING_CHILDREN:
        if process.exitcode is not None:
            process.close()


_LOG_FIRST_SECONDS = 0.05

# Request ids, for every worker of the daemon: never reused, so that a flag on the cancel board
# (server.ipc.cancel_board) naming one request can never be taken for another's.
_request_ids = itertools.count(1)


class _BootFailed(Exception):
    """The worker's BootFailed greeting, inside spawn: the message is its reason."""


async def _end_failed_start(index: int, process: Any, output: OutputReader, error: BaseException) -> NoReturn:
    """A worker that did not greet: see that it has ended, log what it printed, raise why."""
    loop = asyncio.get_running_loop()
    if not isinstance(error, _BootFailed):  # after BootFailed it exits by itself
        process.kill()
    exitcode = await loop.run_in_executor(None, exit_code_of, process, 5.0)
    if exitcode is None:  # it said why it could not boot, yet lives on
        process.kill()
        exitcode = await loop.run_in_executor(None, exit_code_of, process, 5.0)
    release(process)
    output.drain_and_close()  # what it printed (a traceback) goes to the log before the failure
    if isinstance(error, _BootFailed):
        raise WorkerCrashed(f"worker {index} failed to start: {error} (it {describe_exit(exitcode)})") from None
    if not isinstance(error, (TimeoutError, asyncio.IncompleteReadError, ConnectionError, protocol.ProtocolError)):
        raise error
    raise WorkerCrashed(f"worker {index} failed to start: it {describe_exit(exitcode)} ({error!r})") from error


# What a worker process runs: it greets the daemon on the channel, then serves its requests.
WorkerTarget = Callable[[socket.socket, WorkerSettings], None]


class WorkerState(enum.StrEnum):
    """Where a worker is in its life; the value is what Status shows."""

    STARTING = "starting"  # spawned, greeted, being prepared (everything loaded replayed into it)
    IDLE = "idle"  # serving, and no call holds it
    BUSY = "busy"  # serving, and a call holds it
    STOPPED = "stopped"  # its process has ended
    # Never a handle's own state: what Status shows for a slot whose worker died while the
    # supervisor starts its replacement.
    RESTARTING = "restarting"


class CallTiming(NamedTuple):
    """Where one request's time went, in seconds (CLOCK_MONOTONIC is shared by all processes)."""

    to_worker: float  # the daemon starts writing -> the worker has read the request
    in_worker: float  # the worker has read it -> starts writing the reply
    to_daemon: float  # the worker starts writing -> the daemon has read the reply


def describe_request(message: protocol.Request) -> str:
    """A request in words, for the log: "Invoke obj-1f2e.forward (model seed v2)", "HasAttr
    obj-1f2e.weight" (an object with no name)."""
    kind = type(message).__name__
    object_id = getattr(message, "object_id", None)
    if not isinstance(object_id, str):
        return kind
    member = getattr(message, "method", None) or getattr(message, "name", None)
    return describe_call(kind, object_id, member if isinstance(member, str) else "")


def describe_call(kind: str, object_id: str, member: str) -> str:
    """ "Invoke obj-1f2e.forward (model seed v2)": a call in words (also one a worker marked on
    the call board, server.models.dataports)."""
    described = f"{kind} {object_id}.{member}" if member else f"{kind} {object_id}"
    label = object_label(object_id)
    return f"{described} ({label})" if label else described


def interpret_reply(frame: protocol.Frame) -> tuple[Any, list[Any]]:
    """A Result's value and buffers; a Failure raises its domain error."""
    result = frame.message
    if isinstance(result, protocol.Failure):
        raise error_from_failure(result)
    if not isinstance(result, protocol.Result):
        raise protocol.ProtocolError(f"unexpected reply {type(result).__name__}")
    return result.value, frame.buffers


# Signals a process gets from its own faults (or its own abort()), not from outside.
_SELF_INFLICTED_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL, signal.SIGSYS, signal.SIGTRAP}
)


def ended_itself(exitcode: int | None) -> bool:
    """Whether a worker's exit came from the code it ran (os._exit, SystemExit, a segfault,
    an abort) rather than from outside (SIGKILL, SIGTERM: an operator, the OOM killer)."""
    if exitcode is None:
        return False
    if exitcode >= 0:
        return True  # workers leave their loop only when the daemon closes the channel
    return -exitcode in _SELF_INFLICTED_SIGNALS


def exit_cause(exitcode: int | None) -> str:
    """A worker's end in one word, for metrics: exited, crashed (a fault of its own) or killed."""
    if exitcode is not None and exitcode >= 0:
        return "exited"
    return "crashed" if ended_itself(exitcode) else "killed"


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class WorkerHandle:
    def __init__(
        self,
        index: int,
        process: Any,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pid: int,
        shm_threshold: int,
        output: OutputReader,
    ) -> None:
        self.index = index
        self.pid = pid
        self.process = process
        self.state = WorkerState.STARTING  # see the module docstring
        self.calls_served = 0
        self.stopping = False  # set when the daemon, not a crash, ends this worker
        self._stop_reason = ""  # why the daemon stopped it (stop)
        self.exit_reason = ""  # how it ended, in words, for callers and logs
        self.exit_cause = ""  # the same in one word, for metrics (see exit_cause)
        # Once exited: it ended itself (a crash, an exit, a limit of its own) while running a
        # call, rather than being killed from outside or stopped.
        self.ended_by_call = False
        # The call it is running that came another way than this channel (its data port:
        # server.models.dataports sets this), None if none; while one runs, none of the daemon's
        # requests has started.
        self.call_elsewhere: Callable[[], RunningCall | None] = lambda: None
        # Set when the daemon kills the worker for a reason of its own (memory limit, a hung
        # call): (why, cause, whether the call it was running caused it).
        self._kill_reason: tuple[str, str, bool] | None = None
        self._killer: asyncio.Task[None] | None = None  # kill_hung's: the kill after the stack dump
        self._reader = reader
        self._writer = writer
        # Where abandon tells the worker its call's caller is gone (the supervisor sets it).
        self.cancel_board: CancelBoard | None = None
        self._pending: dict[int, asyncio.Future[protocol.Frame]] = {}
        self._inbox = Arena(shm_threshold)
        self._outbox = Arena(shm_threshold)
        self._outbox_size = 0  # grows to what replies have needed
        self._arena_holder: int | None = None  # the request whose tensors use the arenas
        self._sent_at: dict[int, int] = {}  # request id -> monotonic ns when its frame was written
        self._calls: dict[int, RunningCall] = {}  # request id -> the request in words, until answered
        self.output = output
        output.running = self.running_call
        self.on_timing: Callable[[CallTiming], None] = lambda timing: None
        self._exited = asyncio.Event()
        self._lifecycle: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<worker {self.index} pid={self.pid} {self.state}>"

    @property
    def alive(self) -> bool:
        return self.state is not WorkerState.STOPPED

    # ------------------------------------------------------------------ start

    @classmethod
    async def spawn(
        cls,
        index: int,
        context: BaseContext,
        settings: WorkerSettings,
        start_timeout: float,
        on_exit: Callable[[WorkerHandle], None],
        target: WorkerTarget = run_worker,
        on_output_dropped: Callable[[int], None] = lambda size: None,
    ) -> WorkerHandle:
        """Start a worker process running target(channel, settings) and wait for its greeting.
        on_output_dropped(bytes): output the log could not take (the daemon's metric)."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        output_fd, worker_output = open_pipe()
        # A Connection, so that the fork server hands it to the worker as it does the channel.
        output_end = Connection(worker_output, readable=False)
        process = context.Process(  # type: ignore[attr-defined]
            target=target,
            args=(theirs, settings._replace(output=output_end)),
            name=f"deployd-worker-{index}",
            daemon=True,
        )
        try:
            # The first start also launches the fork server (it imports torch: about a second).
            await loop.run_in_executor(None, start_child, process)
        except BaseException:
            os.close(output_fd)
            raise
        finally:
            theirs.close()
            output_end.close()
        output = OutputReader(output_fd, index, process.pid, on_output_dropped)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            greeting = await asyncio.wait_for(protocol.read_frame_async(reader), start_timeout)
            if isinstance(greeting.message, protocol.BootFailed):
                raise _BootFailed(greeting.message.reason)
            if not isinstance(greeting.message, protocol.Ready):
                raise protocol.ProtocolError(f"got {type(greeting.message).__name__} instead of a greeting")
        except BaseException as error:  # cancelled too: a started process must not be left behind
            writer.close()
            await _end_failed_start(index, process, output, error)
        handle = cls(index, process, reader, writer, greeting.message.pid, settings.shm_threshold_bytes, output)
        loop.add_reader(process.sentinel, handle._on_sentinel)
        handle._lifecycle = asyncio.create_task(handle._run(on_exit), name=f"worker-{index}-lifecycle")
        return handle

    # ------------------------------------------------------------------ requests

    def running_call(self) -> RunningCall:
        """What the worker runs now, for the lines it prints: the oldest request unanswered (it
        serves them in order), a call of its data port, or nothing."""
        elsewhere = self.call_elsewhere()
        if elsewhere is not None:
            return elsewhere
        for call in self._calls.values():
            return call
        return RunningCall("starting" if self.state is WorkerState.STARTING else "idle")

    def send(self, message: protocol.Request, buffers: list[Any]) -> asyncio.Future[protocol.Frame]:
        """Send one request; the future resolves with the reply frame, or WorkerCrashed.

        The first request in flight borrows the worker's arenas: its large tensors are
        copied into the inbox, and the outbox is lent for the reply's. Any request sent
        while that one is in flight carries its tensors inline.
        """
        if not self.alive:
            raise WorkerCrashed(f"worker {self.index} {self.exit_reason or 'is stopped'}")
        request_id = next(_request_ids)
        reply: asyncio.Future[protocol.Frame] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        placement: protocol.Placement | None = None
        notes: dict[str, Any] = {}
        deadline = caller_deadline_ns.get()
        if deadline:
            notes["deadline"] = deadline  # for the model to ask (deployd_worker.deadline())
        if self._arena_holder is None:
            self._arena_holder = request_id
            if self._inbox.reserve(self._inbox.wanted(buffers)):
                placement = self._inbox
            if self._outbox.reserve(self._outbox_size) and self._outbox.segment is not None:
                notes["reply_arena"] = (self._outbox.segment.name, self._outbox.segment.size)
        self._sent_at[request_id] = time.monotonic_ns()
        object_id = getattr(message, "object_id", "")
        self._calls[request_id] = RunningCall(
            describe_request(message), object_id if isinstance(object_id, str) else ""
        )
        protocol.write_frame_async(self._writer, request_id, message, buffers, placement, notes)
        return reply

    async def request(self, message: protocol.Request, buffers: list[Any]) -> tuple[Any, list[Any]]:
        """Send one request and wait for its result value and buffers.

        Raises the domain error for a Failure reply, or WorkerCrashed if the worker dies first.
        """
        return interpret_reply(await self.send(message, buffers))

    def _on_reply(self, frame: protocol.Frame) -> None:
        # A reply whose caller gave up still arrives, finds its own future, and is dropped:
        # it can never answer a later call.
        reply = self._pending.pop(frame.request_id, None)
        sent_at = self._sent_at.pop(frame.request_id, None)
        self._calls.pop(frame.request_id, None)
        times = frame.notes.get("times")
        if sent_at is not None and times is not None:
            received_at, replied_at = times
            now = time.monotonic_ns()
            self.on_timing(
                CallTiming((received_at - sent_at) / 1e9, (replied_at - received_at) / 1e9, (now - replied_at) / 1e9)
            )
        if frame.request_id == self._arena_holder:
            self._arena_holder = None
            if frame.notes.get("inbox_retained"):
                # Model code kept its inputs: they stay in the worker's mapping, and the
                # next call's inputs go to a new segment instead of over them.
                self._inbox.retire()
            self._outbox_size = max(self._outbox_size, frame.notes.get("reply_bytes_wanted", 0))
        if reply is not None and not reply.done():
            reply.set_result(frame)

    def abandon(self, reply: asyncio.Future[protocol.Frame], grace: float, call: str = "") -> None:
        """The caller of this request gave up (deadline or cancellation). The worker is told
        (the cancel board: model code that asks stops early) and takes no other call until it
        answers; if it has not answered within grace seconds, it is taken to be stuck and
        killed, so that a hung model cannot keep the capacity. call: the request in words,
        for the log."""
        if reply.done():
            return
        request_id = next((key for key, pending in self._pending.items() if pending is reply), 0)
        if self.cancel_board is not None and request_id:
            self.cancel_board.flag(self.index, request_id)
        loop = asyncio.get_running_loop()
        why = f"was killed: a call ran {grace:g}s past its caller giving up"
        hung = f"its caller gave up {grace:g}s ago"
        timer = loop.call_later(grace, self.kill_hung, call, hung, why, "abandoned_call", False)
        reply.add_done_callback(lambda _: timer.cancel())

    # ------------------------------------------------------------------ exit

    def kill(self, reason: str, cause: str, caused_by_call: bool) -> None:
        """SIGKILL the worker for a reason of the daemon's own; callers see the reason."""
        if not self.alive or self.stopping or self._kill_reason is not None:
            return
        log.warning("worker %d (pid %d) %s", self.index, self.pid, reason)
        self._kill_reason = (reason, cause, caused_by_call)
        self.process.kill()

    def kill_hung(self, call: str, hung: str, reason: str, cause: str, caused_by_call: bool) -> None:
        """Kill a worker stuck in a call, as kill does, once it has written where it is stuck:
        its Python stacks (every thread's) go to its stderr, the daemon's log, first.
        call: the call in words; hung: why it counts as stuck, for the log line."""
        if not self.alive or self.stopping or self._kill_reason is not None:
            return
        log.warning(
            "worker %d (pid %d) is stuck in %s: %s; its stacks follow (%s), then it is killed",
            self.index,
            self.pid,
            call or "a call",
            hung,
            DUMP_STACKS_SIGNAL.name,
        )
        self._kill_reason = (reason, cause, caused_by_call)
        self._killer = asyncio.create_task(self._dump_then_kill(), name=f"worker-{self.index}-kill")

    async def _dump_then_kill(self) -> None:
        # The line above goes out on the log's own thread, a moment later; the stacks come
        # straight from the worker: give the line its moment, so that it reads first.
        await asyncio.sleep(_LOG_FIRST_SECONDS)
        if self._exited.is_set():
            return
        try:
            os.kill(self.pid, DUMP_STACKS_SIGNAL)
        except ProcessLookupError:
            return  # gone already: its lifecycle task takes the exit
        try:
            await asyncio.wait_for(self._exited.wait(), STACK_DUMP_SECONDS)
        except TimeoutError:
            self.process.kill()

    async def stop(self, timeout: float, reason: str = "") -> None:
        """Ask the worker to exit (close its channel), then terminate, then kill; reason (why the
        daemon stops it) becomes its exit_reason, unless it had already ended."""
        self.stopping = True
        self._stop_reason = self._stop_reason or reason
        self._writer.close()
        for escalate in (self.process.terminate, self.process.kill):
            try:
                await asyncio.wait_for(self._exited.wait(), timeout)
                break
            except TimeoutError:
                log.warning("worker %d (pid %d) did not stop in %.1fs; escalating", self.index, self.pid, timeout)
                escalate()
        if self._lifecycle is not None:
            await self._lifecycle

    def _on_sentinel(self) -> None:
        asyncio.get_running_loop().remove_reader(self.process.sentinel)
        self._exited.set()

    async def _run(self, on_exit: Callable[[WorkerHandle], None]) -> None:
        replies = asyncio.create_task(self._read_replies())
        exited = asyncio.create_task(self._exited.wait())
        await asyncio.wait({replies, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not replies.done():
            # The process is gone; take any replies it wrote first, unless something it
            # forked holds the channel open.
            await asyncio.wait({replies}, timeout=_DRAIN_SECONDS)
            replies.cancel()
        if not self._exited.is_set():
            # The channel closed but the process lives on: it is of no more use.
            self.process.kill()
            await self._exited.wait()
        exited.cancel()
        self._writer.close()
        exitcode = await asyncio.get_running_loop().run_in_executor(None, exit_code_of, self.process, 0)
        release(self.process)
        if self._kill_reason is not None:
            self.exit_reason, self.exit_cause, caused_by_call = self._kill_reason
        elif self.stopping and self._stop_reason:
            self.exit_reason, self.exit_cause = f"was stopped ({self._stop_reason})", "stopped"
            caused_by_call = False
        else:
            self.exit_reason, self.exit_cause = describe_exit(exitcode), exit_cause(exitcode)
            caused_by_call = ended_itself(exitcode)
        # Its last lines (what it printed as it died) are logged before its end, tagged with
        # what it ran; whatever it wrote is in the pipe already.
        self.output.drain_and_close()
        self.ended_by_call = caused_by_call and not self.stopping
        self.state = WorkerState.STOPPED
        # A worker serves its requests one at a time, in the order sent: the oldest one
        # unanswered is the one it was running (unless it was running a call of its data
        # port); the others waited behind it and did not cause its end, whatever it was.
        running = self.call_elsewhere() is None
        for reply in self._pending.values():
            if reply.done():
                continue
            if running:
                crash = WorkerCrashed(
                    f"worker {self.index} (pid {self.pid}) {self.exit_reason} while serving this call",
                    caused_by_call=caused_by_call and not self.stopping,
                )
            else:
                crash = WorkerCrashed(
                    f"worker {self.index} (pid {self.pid}) {self.exit_reason} while running an earlier"
                    " request, before it could start this one",
                    started=False,
                )
            reply.set_exception(crash)
            running = False
        self._pending.clear()
        self._sent_at.clear()
        self._calls.clear()
        self._inbox.retire()
        self._outbox.retire()
        on_exit(self)

    async def _read_replies(self) -> None:
        try:
            while True:
                self._on_reply(await protocol.read_frame_async(self._reader, self._outbox.read))
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        except Exception:  # a ProtocolError, a shared ref outside the outbox, notes of the wrong shape
            # Whatever the worker wrote (model code can write to the channel's descriptor too),
            # a frame the daemon cannot take leaves the channel unusable: the worker goes, and
            # its pending requests fail at once instead of waiting for a reader that has died.
            log.exception("worker %d sent a malformed frame; stopping it", self.index)
            self.process.kill()
