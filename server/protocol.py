"""Messages between the daemon and a worker process, and how they are framed.

    daemon (asyncio)                               worker (one blocking loop)
    ----------------                               --------------------------
    WorkerHandle.request(LoadPickle, ...) --frame-->  read_frame
                                                      Runtime.handle(message)
                        future resolved <--frame---  Result(value) | Failure(...)

Every frame carries a request id; a reply resolves the future waiting for that id,
so several requests may be in flight on one channel. Id 0 is the worker's `Ready`
greeting.

A frame is an 8-byte prefix (header length, number of buffers), the header, then
each buffer as an 8-byte length and its bytes. The header is `marshal` of builtins
only (never pickle: failures cross as data, not as exception objects). Tensor bytes
never go inside the header: they travel as separate buffers that values refer to by
index, so tensors can move to shared memory by sending a (segment, offset) instead
of the buffer, with no change to any message.

Packed values (arguments and results) are builtins: None, bool, int, float, str,
bytes, list and dict as themselves; a *tuple* is always a tag:
    ("tuple", [items])                         a Python tuple
    ("tensor", dtype_name, [shape], index)     a dense C-order tensor in buffers[index]
"""

from __future__ import annotations

import asyncio
import marshal
import socket
import struct
from typing import Any, NamedTuple

# ------------------------------------------------------------------ requests (daemon -> worker)


class RegisterModule(NamedTuple):
    name: str
    source: str


class OpenPackage(NamedTuple):
    package_id: str
    path: str
    # The package's tensor storages in a shared segment (server.weights); "" for none.
    weights_segment: str
    weights_size: int
    weights_index: dict[str, tuple[int, int]]  # record name -> (offset, bytes)


class ClosePackage(NamedTuple):
    package_id: str


class LoadPickle(NamedTuple):
    object_id: str
    package_id: str
    module: str
    file: str


class UnloadObject(NamedTuple):
    object_id: str


class Invoke(NamedTuple):
    object_id: str
    method: str
    args: list[Any]  # packed values
    kwargs: dict[str, Any]  # packed values


class HasAttr(NamedTuple):
    object_id: str
    name: str


class LoadResource(NamedTuple):
    package_id: str
    module: str
    resource: str
    binary: bool


# ------------------------------------------------------------------ replies (worker -> daemon)


class Ready(NamedTuple):
    pid: int


class Result(NamedTuple):
    value: Any  # a packed value


class Failure(NamedTuple):
    kind: str  # one of the FAILURE_* names below
    type_name: str  # the exception's type name, e.g. "ValueError"
    message: str
    traceback: str


# What went wrong, as the daemon needs to know it to pick a status code.
FAILURE_MODEL_ERROR = "model_error"  # model code raised
FAILURE_INVALID_ARGUMENT = "invalid_argument"  # bad package, module, pickle or value
FAILURE_NOT_FOUND = "not_found"  # no such object, package or method in the worker

Request = RegisterModule | OpenPackage | ClosePackage | LoadPickle | UnloadObject | Invoke | HasAttr | LoadResource
Reply = Ready | Result | Failure
Message = Request | Reply

_MESSAGE_TYPES: tuple[type[Any], ...] = (
    RegisterModule,
    OpenPackage,
    ClosePackage,
    LoadPickle,
    UnloadObject,
    Invoke,
    HasAttr,
    LoadResource,
    Ready,
    Result,
    Failure,
)
_TAG_OF = {cls: tag for tag, cls in enumerate(_MESSAGE_TYPES)}

_PREFIX = struct.Struct("<II")  # header length, number of buffers
_LENGTH = struct.Struct("<Q")

Buffer = bytes | bytearray | memoryview


class Frame(NamedTuple):
    request_id: int
    message: Message
    buffers: list[Any]  # bytes-like, indexed by packed tensors


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def encode_frame(request_id: int, message: Message, buffers: list[Buffer]) -> list[Buffer]:
    """Return the pieces of one frame, ready to be written in order."""
    header = marshal.dumps((request_id, _TAG_OF[type(message)], tuple(message)))
    pieces: list[Buffer] = [_PREFIX.pack(len(header), len(buffers)) + header]
    for buffer in buffers:
        pieces.append(_LENGTH.pack(memoryview(buffer).nbytes))
        pieces.append(buffer)
    return pieces


def decode_header(header: bytes, buffers: list[Any]) -> Frame:
    try:
        request_id, tag, fields = marshal.loads(header)
        message = _MESSAGE_TYPES[tag](*fields)
    except (ValueError, EOFError, TypeError, IndexError) as error:
        raise ProtocolError(f"malformed frame header: {error}") from error
    return Frame(request_id, message, buffers)


# ------------------------------------------------------------------ daemon side: asyncio streams


async def read_frame_async(reader: asyncio.StreamReader) -> Frame:
    """Read one frame; raises asyncio.IncompleteReadError at end of stream."""
    header_length, buffer_count = _PREFIX.unpack(await reader.readexactly(_PREFIX.size))
    header = await reader.readexactly(header_length)
    buffers = []
    for _ in range(buffer_count):
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        buffers.append(await reader.readexactly(length))
    return decode_header(header, buffers)


def write_frame_async(writer: asyncio.StreamWriter, request_id: int, message: Message, buffers: list[Buffer]) -> None:
    writer.writelines(encode_frame(request_id, message, buffers))


# ------------------------------------------------------------------ worker side: a blocking socket


def _recv_exactly(sock: socket.socket, length: int) -> bytearray:
    """Read exactly length bytes into a fresh, writable buffer (tensors wrap it without a copy)."""
    data = bytearray(length)
    view = memoryview(data)
    received = 0
    while received < length:
        count = sock.recv_into(view[received:])
        if count == 0:
            raise EOFError("channel closed")
        received += count
    return data


def read_frame_blocking(sock: socket.socket) -> Frame:
    """Read one frame; raises EOFError when the daemon has closed the channel."""
    header_length, buffer_count = _PREFIX.unpack(_recv_exactly(sock, _PREFIX.size))
    header = bytes(_recv_exactly(sock, header_length))
    buffers = []
    for _ in range(buffer_count):
        (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
        buffers.append(_recv_exactly(sock, length))
    return decode_header(header, buffers)


def write_frame_blocking(sock: socket.socket, request_id: int, message: Message, buffers: list[Buffer]) -> None:
    for piece in encode_frame(request_id, message, buffers):
        sock.sendall(piece)
