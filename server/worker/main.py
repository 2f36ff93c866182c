"""A worker process's entry point: boot (server.worker.boot), greet the daemon, then serve
requests until the channel closes.

Each request runs as deployd_worker's running call (deployd_worker._call): model code may ask
for its caller's deadline (the request's notes) and whether the caller gave up (this worker's
word of the cancel board, server.ipc.cancel_board, mapped once at start).

Imported by the fork server before any worker exists, so that torch is loaded once
and every worker forked from it starts warm. Nothing here may start threads or run
torch ops at import time: a fork after OpenMP has started hangs the child.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

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
from server.worker.boot import boot
from server.worker.entry import WorkerSettings
from server.worker.runtime import Runtime
from server.worker.shared import ArenaMappings, ReplyPlacement


def worker_main(channel: socket.socket, settings: WorkerSettings) -> None:
    runtime = boot(channel, settings)  # or BootFailed, and exit
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
