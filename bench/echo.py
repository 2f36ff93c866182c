"""The baseline: a bare grpc.aio echo server, in its own process.

`Echo(Blob) returns (Blob)` with `message Blob { bytes data = 1; }`: the least a Python
gRPC server can do with a request, so deployd's Invoke is compared against the same
transport, the same protobuf runtime and the same bytes, minus everything deployd adds.
The message type is built at run time from a descriptor; there is no generated code.

Run as `python -m bench.echo --lifetime SECONDS`: prints its port, serves on 127.0.0.1
until SIGTERM (or the lifetime ends).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from bench.common import REPO, BenchError, python_command, stop_process
from server.app import eventloop

SERVICE = "benchecho.Echo"
METHOD = f"/{SERVICE}/Echo"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def _blob_class() -> Any:
    """`message Blob { bytes data = 1; }` in a descriptor pool of its own."""
    file = descriptor_pb2.FileDescriptorProto(name="bench/echo.proto", package="benchecho", syntax="proto3")
    blob = file.message_type.add(name="Blob")
    blob.field.add(
        name="data",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("benchecho.Blob"))


Blob = _blob_class()


def echo_method(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """The Echo method on a channel (sync or aio): call it with a Blob, get a Blob."""
    return channel.unary_unary(METHOD, request_serializer=Blob.SerializeToString, response_deserializer=Blob.FromString)


# ---------------------------------------------------------------------------- the server process


async def _echo(request: Any, context: Any) -> Any:
    return Blob(data=request.data)


async def serve(lifetime: float) -> None:
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(
        _echo, request_deserializer=Blob.FromString, response_serializer=Blob.SerializeToString
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(port, flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), lifetime)
    await server.stop(0)


# ---------------------------------------------------------------------------- the supervisor's handle


class EchoServer:
    """`with EchoServer(env) as echo:` runs the echo server; echo.target is its address."""

    def __init__(self, env: dict[str, str] | None = None, lifetime: float = 1800.0) -> None:
        self.env = {**os.environ, **(env or {})}
        self.lifetime = lifetime
        self.port = 0
        self.process: subprocess.Popen[str] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> EchoServer:
        command = python_command("-m", "bench.echo", "--lifetime", str(self.lifetime))
        self.process = subprocess.Popen(
            command, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        try:
            self.port = self._read_port(self.process, timeout=60.0)
        except BaseException:
            stop_process(self.process)
            raise
        return self

    @staticmethod
    def _read_port(process: subprocess.Popen[str], timeout: float) -> int:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            raise BenchError(f"the echo server did not report its port (exit code {process.poll()})")
        return int(line)

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            code = stop_process(self.process)
            if self.process.stdout is not None:
                self.process.stdout.close()
            if code != 0:
                print(f"note: the echo server exited with code {code}", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lifetime", type=float, default=1800.0, help="stop after this many seconds")
    # The same event loop as the daemon's default, so the comparison is of what deployd adds.
    eventloop.run(serve(parser.parse_args().lifetime))
