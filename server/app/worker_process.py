"""A worker process that serves calls itself: its runtime, the daemon's channel, its data port.

    fork server ──fork──> run_worker(channel, settings, data)
                            boot: output, user, limits, threads (as every worker)
                            one event loop, one thread:
                              the daemon's channel ──> Runtime.handle (loads, replays, daemon-path calls)
                                  OpenDataPort / CloseDataPort / SetRoutes ──> DataPort
                              DataPort (grpc.aio) ──> Runtime.handle (the calls clients send it)

Model code runs only on the loop's thread, one request at a time, whichever way it came.
The daemon names this function as the worker's target when pool.data_ports is set; it is
imported in the worker after the fork (the fork server never loads grpc), and never imports
torch at module level (the daemon imports this module to name it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from server import logs
from server.api.dataport import DataPort, DataPortSettings
from server.app import eventloop
from server.app.config import TracingSection
from server.app.tracing import start_tracing
from server.errors import DeploydError
from server.ipc import protocol
from server.worker.entry import WorkerSettings

log = logging.getLogger(__name__)


def run_worker(channel: socket.socket, settings: WorkerSettings, data: DataPortSettings) -> None:
    from server.worker.boot import boot
    from server.worker.output import daemon_stderr

    runtime = boot(channel, settings)  # or BootFailed, and exit
    # The data port logs its calls as the daemon logs its own, each line tagged with the worker,
    # to the daemon's stderr: its output pipe is for what model code prints.
    logs.write_to(daemon_stderr())
    logs.start(data.log_level)
    logs.use_format(data.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_tag)
    # The port is this call's edge: its spans are made and sent here (started after the fork:
    # the fork server never runs grpc, nor any thread).
    stop_tracing = start_tracing(data.tracing) if isinstance(data.tracing, TracingSection) else None
    try:
        eventloop.run(_serve(channel, runtime, settings, data), data.event_loop)
    finally:
        if stop_tracing is not None:
            stop_tracing()
        logs.stop()


class _WorkerTag(logging.Filter):
    """Adds the worker's slot and pid to a record's fields (plain: key=value; JSON: keys)."""

    slot = -1

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None) or {}
        record.fields = {**fields, "worker": self.slot, "pid": os.getpid()}
        return True


_tag = _WorkerTag()


async def _serve(channel: socket.socket, runtime: Any, settings: WorkerSettings, data: DataPortSettings) -> None:
    from server.worker.main import cancel_flags, serve_channel
    from server.worker.shared import ArenaMappings

    port = DataPort(data, runtime.handle)

    async def handle(message: protocol.Request, buffers: list[Any]) -> tuple[protocol.Reply, list[Any]]:
        try:
            if isinstance(message, protocol.OpenDataPort):
                _tag.slot = message.slot
                return protocol.Result(await port.open(message)), []
            if isinstance(message, protocol.CloseDataPort):
                await port.close(message.grace)
                return protocol.Result(None), []
            if isinstance(message, protocol.SetRoutes):
                port.models.set_routes(message)
                return protocol.Result(None), []
            if isinstance(message, protocol.UnloadObject):
                await port.models.retire(message.object_id)  # its batched calls finish first
        except DeploydError as error:
            return protocol.Failure(protocol.FAILURE_INVALID_ARGUMENT, "", str(error), ""), []
        reply: tuple[protocol.Reply, list[Any]] = runtime.handle(message, buffers)
        return reply

    reader, writer = await asyncio.open_unix_connection(sock=channel)
    try:
        await serve_channel(
            reader, writer, handle, ArenaMappings(), settings.shm_threshold_bytes, cancel_flags(settings)
        )
    finally:
        # The daemon closed the channel (it stops this worker) or died: calls still running
        # on the port are cut short, as they would be by the process's end.
        await port.close(0)
        writer.close()
