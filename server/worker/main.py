"""A worker process's entry point: greet the daemon, then serve requests until the channel closes.

Each request runs as deployd_worker's running call (deployd_worker._call): model code may ask
for its caller's deadline (the request's notes) and whether the caller gave up (this worker's
word of the cancel board, server.ipc.cancel_board, mapped once at start).

Imported by the fork server before any worker exists, so that torch is loaded once
and every worker forked from it starts warm. Nothing here may start threads or run
torch ops at import time: a fork after OpenMP has started hangs the child.
"""

from __future__ import annotations

import asyncio
import ctypes
import faulthandler
import os
import resource
import signal
import socket
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from deployd_worker._call import Call, running
from server.ipc.cancel_board import map_slot_word
from server.ipc.protocol import (
    Ready,
    Reply,
    Request,
    encode_frame,
    encode_header,
    place_buffers,
    read_frame_async,
    read_frame_blocking,
    write_frame_blocking,
)
from server.worker.entry import DUMP_STACKS_SIGNAL, WorkerSettings
from server.worker.exit_codes import WorkerExitCode
from server.worker.runtime import Runtime
from server.worker.shared import ArenaMappings, ReplyPlacement


def worker_main(channel: socket.socket, settings: WorkerSettings) -> None:
    runtime = start_worker_process(settings)
    mappings = ArenaMappings()
    flags = cancel_flags(settings)
    write_frame_blocking(channel, encode_frame(0, Ready(os.getpid()), []))
    while serve_one(channel, runtime, mappings, settings.shm_threshold_bytes, flags):
        pass


def cancel_flags(settings: WorkerSettings) -> memoryview | None:
    """This worker's word of the cancel board (server.ipc.cancel_board); None: no board."""
    if not settings.cancel_board or settings.slot < 0:
        return None
    return map_slot_word(settings.cancel_board, settings.slot)


def call_of(request_id: int, notes: dict[str, Any], flags: memoryview | None) -> Call:
    """A request as model code sees it (deployd_worker): its caller's deadline, and its flag."""
    deadline = notes.get("deadline", 0)
    return Call(deadline if type(deadline) is int else 0, flags, request_id)


def start_worker_process(settings: WorkerSettings) -> Runtime:
    """What every worker does first, before any model code runs: its user, limits and threads."""
    _become_user(settings.uid, settings.gid)  # first: a change of user clears the parent-death signal
    _die_with_parent()
    _limit_resources(settings)
    # Ctrl-C reaches the whole process group; the daemon decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Before killing a hung worker the daemon asks for its stacks: written from C, with no
    # Python code run, so they come even while a model holds the interpreter.
    if sys.stderr is not None:
        faulthandler.register(DUMP_STACKS_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
    # torch.package's unpickler still uses TypedStorage; the warning says nothing to an operator.
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    # A tensor read from a socket or a gRPC request wraps bytes owned by that one request
    # alone (dropped once it is answered), so model code writing to it harms no one.
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    torch.set_num_threads(settings.num_threads)
    sys.path.extend(settings.extra_sys_paths)
    return Runtime()


def _become_user(uid: int, gid: int) -> None:
    """Drop root for worker.user before any model code runs; workers never get it back."""
    if uid < 0 or os.getuid() == uid:
        return
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _limit_resources(settings: WorkerSettings) -> None:
    """worker.max_open_files and worker.max_address_space_bytes, as soft and hard limits:
    model code cannot raise them again. Past them, opening a file fails with EMFILE and an
    allocation with MemoryError (torch: RuntimeError "can't allocate memory"), in that call."""
    for which, value in (
        (resource.RLIMIT_NOFILE, settings.max_open_files),
        (resource.RLIMIT_AS, settings.max_address_space_bytes),
    ):
        if value:
            hard = resource.getrlimit(which)[1]
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)  # only root may raise a hard limit
            resource.setrlimit(which, (value, value))


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this worker when its parent dies (Linux).

    The parent is the fork server, which exits when the daemon does, however the daemon
    ends (even SIGKILL). An idle worker would notice anyway (its channel reaches EOF),
    but one busy in a long call would not until the call ends.
    """
    # multiprocessing hands every forked child the write end of the fork server's "alive"
    # pipe, so that children may fork through it too; the fork server then lives while any
    # worker does, and a busy worker would wait for it forever. Workers never fork.
    from multiprocessing import forkserver

    server: Any = forkserver._forkserver  # type: ignore[attr-defined]
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not Linux: the channel's EOF is the only signal
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(WorkerExitCode.BOOT_FAILED)


_PR_SET_PDEATHSIG = 1


def serve_one(
    channel: socket.socket,
    runtime: Runtime,
    mappings: ArenaMappings,
    threshold: int,
    flags: memoryview | None = None,
) -> bool:
    """Read one request, handle it, write its reply; False once the daemon has gone.
    flags: this worker's word of the cancel board, for deployd_worker.cancelled()."""
    try:
        request_id, message, inputs, notes = read_frame_blocking(channel, mappings.view)
    except (EOFError, ConnectionError):
        return False  # the daemon closed the channel, or died: either way, stop.
    received_at = time.monotonic_ns()  # the clock is system-wide: the daemon compares it with its own
    with running(call_of(request_id, notes, flags)):
        handled = runtime.handle(message, inputs)  # type: ignore[arg-type]
    write_frame_blocking(channel, answer(request_id, received_at, handled, inputs, notes, mappings, threshold))
    return True


def answer(
    request_id: int,
    received_at: int,
    handled: tuple[Reply, list[Any]],
    inputs: list[Any],
    notes: dict[str, Any],
    mappings: ArenaMappings,
    threshold: int,
) -> list[Any]:
    """The reply frame's pieces for a handled request. Empties inputs (the request's buffers):
    what still refers to their shared memory then is what model code kept."""
    reply, outputs = handled
    placement = ReplyPlacement(mappings, notes.get("reply_arena"), threshold)
    refs, inline = place_buffers(outputs, placement)
    outputs.clear()  # the caller's reference to the list too: its tensors may hold the inputs' memory
    reply_notes: dict[str, Any] = {}
    if placement.bytes_wanted:
        reply_notes["reply_bytes_wanted"] = placement.bytes_wanted
    shared_inputs = [buffer for buffer in inputs if isinstance(buffer, memoryview)]
    inputs.clear()
    if shared_inputs:
        # Copy out what goes inline, so that the only references left to the inputs'
        # shared memory are the ones model code kept.
        inline = [memoryview(bytes(view)) for view in inline]
        if _still_referenced(shared_inputs):
            reply_notes["inbox_retained"] = True
    reply_notes["times"] = (received_at, time.monotonic_ns())
    return encode_header(request_id, reply, refs, inline, reply_notes)


async def serve_channel(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handle: Callable[[Request, list[Any]], Awaitable[tuple[Reply, list[Any]]]],
    mappings: ArenaMappings,
    threshold: int,
    flags: memoryview | None = None,
) -> None:
    """The daemon's channel on an event loop (a worker with a data port): each request is
    handled in turn, as serve_one does, until the daemon closes the channel."""
    writer.writelines(encode_frame(0, Ready(os.getpid()), []))
    while True:
        try:
            request_id, message, inputs, notes = await read_frame_async(reader, mappings.view)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        received_at = time.monotonic_ns()
        # Calls of the data port may run while this one awaits: each puts this one back after it.
        with running(call_of(request_id, notes, flags)):
            handled = await handle(message, inputs)  # type: ignore[arg-type]
        writer.writelines(answer(request_id, received_at, handled, inputs, notes, mappings, threshold))
        await writer.drain()


def _still_referenced(views: list[memoryview]) -> bool:
    # One reference from the list, one from the loop variable, one as getrefcount's argument;
    # a tensor still wrapping the view holds another.
    return any(sys.getrefcount(view) > 3 for view in views)
