"""Messages between the daemon and a worker process, and how they are framed.

    daemon (asyncio)                               worker (one blocking loop)
    ----------------                               --------------------------
    WorkerHandle.request(LoadPickle, ...) --frame-->  read_frame
                                                      Runtime.handle(message)
                        future resolved <--frame---  Result(value) | Failure(...)

Every frame carries a request id; a reply resolves the future waiting for that id,
so several requests may be in flight on one channel. Id 0 is the worker's `Ready`
greeting, or `BootFailed` (why it could not boot) before it exits.

A frame is a 4-byte header length, the header, then the inline buffers. The header
is `marshal` of builtins only (never pickle: failures cross as data, not as exception
objects): (request id, message tag, message fields, buffer refs, notes). Tensor bytes
never go inside the header: values refer to buffers by index, and each buffer ref is
either a length (the bytes follow inline) or (segment, offset, length) in shared
memory the daemon owns. The writer's Placement decides which: small buffers go
inline, where one copy through the socket is cheaper than the bookkeeping; large ones
are copied once into a reusable arena, and the reader wraps them without a copy.

Packed values (arguments and results) are builtins: None, bool, int, float, str,
bytes, list and dict as themselves; a *tuple* is always a tag:
    ("tuple", [items])                         a Python tuple
    ("tensor", dtype_name, [shape], index)     a dense C-order tensor in buffers[index]
    ("obj", number)                            an object of the request's session (arguments only)
"""

from __future__ import annotations

import asyncio
import marshal
import socket
import struct
from typing import Any, Callable, NamedTuple, Protocol

# ------------------------------------------------------------------ requests (daemon -> worker)


class RegisterModule(NamedTuple):
    name: str
    source: str


class OpenPackage(NamedTuple):
    package_id: str
    path: str
    # The package's tensor storages in a shared segment (server.models.weights); "" for none.
    weights_segment: str
    weights_size: int
    weights_index: dict[str, tuple[int, int]]  # record name -> (offset, bytes)


class ClosePackage(NamedTuple):
    package_id: str


class LoadPickle(NamedTuple):
    """Unpickle an object; the reply is the seconds its warmup ran (None without one)."""

    object_id: str
    package_id: str
    module: str
    file: str
    # Calls run on the object before the reply (server.worker.warmup), () for none:
    # (method, [ARG texts], {name: ARG text}, torch.save bytes of the arguments or b"", repeat)
    warmup: tuple[Any, ...] = ()
    # Where it runs: "cpu", or "cuda" (the one GPU this worker sees: CUDA_VISIBLE_DEVICES).
    device: str = "cpu"
    # Its weights, shared by its GPU's keeper (server.worker.handles): state name -> handle;
    # {}: the worker moves its own copy to the device.
    shared: dict[str, Any] = {}


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


# A session's objects (server.worker.sessions): the daemon numbers them (`result`: the number
# the new object gets), so it can count and check them without asking the worker. A reply to
# one that makes an object is the object's type name.


class SessionGlobal(NamedTuple):
    session_id: str
    result: int
    module: str
    name: str


class SessionFromValue(NamedTuple):
    session_id: str
    result: int
    value: Any  # a packed value


class SessionFromObject(NamedTuple):
    """The worker's replica of a loaded object (object_id), or its importer of a package (package_id)."""

    session_id: str
    result: int
    object_id: str
    package_id: str


class ObjCall(NamedTuple):
    session_id: str
    result: int
    target: int
    method: str  # "": call the object itself
    args: list[Any]  # packed values, which may hold ("obj", number) of this session
    kwargs: dict[str, Any]


class ObjAttr(NamedTuple):
    session_id: str
    result: int  # 0: only whether it has the attribute (a bool reply)
    target: int
    name: str


class ObjToValue(NamedTuple):
    session_id: str
    target: int


class ExportObj(NamedTuple):
    """Export a session's object with torch.package (createMovable); the reply is the archive,
    as a uint8 tensor."""

    session_id: str
    target: int


# Where an ExportObj archive keeps the object: the daemon loads it from there on every worker.
MOVABLE_MODULE, MOVABLE_FILE = "deployd_movable", "object.pkl"


class SessionClose(NamedTuple):
    session_id: str


# A worker with a data port (pool.data_ports) serves calls itself (server.app.worker_process).
# The daemon opens the port once everything loaded was replayed into the worker, and tells it
# what names and ids serve; calls that reach the port resolve against that table.


class OpenDataPort(NamedTuple):
    """Start serving calls on port (0: any free one); the reply is the port bound."""

    slot: int
    port: int


class CloseDataPort(NamedTuple):
    """Stop taking calls on the data port; those in flight get grace seconds to finish."""

    grace: float


class SetRoutes(NamedTuple):
    """What the data port serves: model names and object ids, as the daemon's tables say now."""

    generation: int  # the daemon's endpoints generation (deployd.v1 Endpoints)
    models: dict[str, tuple[int, dict[int, str]]]  # name -> (serving version, {version: object id})
    objects: list[str]  # object ids loaded
    # name -> (inputs, outputs) a model's config entry declares, each (name, datatype, shape)
    signatures: dict[str, tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]]
    # object id -> (max_batch_size, max_queue_delay_ms, preferred_batch_sizes) of the versions that batch
    batching: dict[str, tuple[int, float, list[int]]]


# ------------------------------------------------------------------ replies (worker -> daemon)


class Ready(NamedTuple):
    pid: int


class BootFailed(NamedTuple):
    """Instead of Ready: the worker could not boot, and exits (WorkerExitCode.BOOT_FAILED)."""

    pid: int
    reason: str  # the step and its error: "setting RLIMIT_AS to 1048576: ValueError: ..."


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
# Model code stopped because its caller was gone (deployd_worker.check raised Cancelled).
FAILURE_CANCELLED = "cancelled"  # the caller cancelled the call
FAILURE_DEADLINE_EXCEEDED = "deadline_exceeded"  # the caller's deadline passed
FAILURE_OUT_OF_MEMORY = "out_of_memory"  # the model's device ran out of memory (CUDA)

Request = (
    RegisterModule
    | OpenPackage
    | ClosePackage
    | LoadPickle
    | UnloadObject
    | Invoke
    | HasAttr
    | LoadResource
    | SessionGlobal
    | SessionFromValue
    | SessionFromObject
    | ObjCall
    | ObjAttr
    | ObjToValue
    | ExportObj
    | SessionClose
    | OpenDataPort
    | CloseDataPort
    | SetRoutes
)
Reply = Ready | BootFailed | Result | Failure
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
    SessionGlobal,
    SessionFromValue,
    SessionFromObject,
    ObjCall,
    ObjAttr,
    ObjToValue,
    ExportObj,
    SessionClose,
    OpenDataPort,
    CloseDataPort,
    SetRoutes,
    Ready,
    Result,
    Failure,
    BootFailed,
)
_TAG_OF = {cls: tag for tag, cls in enumerate(_MESSAGE_TYPES)}

Buffer = bytes | bytearray | memoryview


# Where a buffer lies in shared memory: (segment name, offset, length).
SharedRef = tuple[str, int, int]
ALIGNMENT = 64  # buffers in shared memory start on a cache line: aligned for every dtype


def align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class Placement(Protocol):
    """Decides whether a buffer goes into shared memory (and copies it there) or inline.

    A buffer comes as its parts, to be laid end to end (one part, but for a Gathered one).
    """

    def place(self, parts: list[memoryview]) -> SharedRef | None: ...


class Gathered(NamedTuple):
    """One buffer made of parts laid end to end: a batch's tensor, its callers' rows one after
    another. Each part is written straight into its place (the shared-memory inbox, or the
    socket), never joined into one bytes object first."""

    parts: list[Any]  # bytes-like


def buffer_parts(buffer: Any) -> list[memoryview]:
    """A buffer's bytes, as the views to lay end to end."""
    if type(buffer) is Gathered:
        return [memoryview(part).cast("B") for part in buffer.parts]
    return [memoryview(buffer).cast("B")]


class Frame(NamedTuple):
    request_id: int
    message: Message
    buffers: list[Any]  # bytes-like, indexed by packed tensors
    # Transport notes beside the message: "reply_arena" (name, size) lent for the reply's
    # tensors; "inbox_retained" when model code kept a reference to its inputs' memory;
    # "reply_bytes_wanted" when the reply's tensors did not fit the arena lent; "times"
    # (received, replied) on the worker's monotonic clock, in nanoseconds; "deadline", the
    # caller's, on the same clock (a request; none without one: deployd_worker.deadline()).
    notes: dict[str, Any]


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


_HEADER_LENGTH = struct.Struct("<I")
_SMALL_FRAME = 64 * 1024


def encode_frame(
    request_id: int,
    message: Message,
    buffers: list[Buffer],
    placement: Placement | None = None,
    notes: dict[str, Any] | None = None,
) -> list[Buffer]:
    """Return the pieces of one frame, ready to be written in order.

    Buffers that placement takes travel as references; the others follow the header inline.
    """
    refs, inline = place_buffers(buffers, placement)
    return encode_header(request_id, message, refs, inline, notes)


def place_buffers(buffers: list[Buffer], placement: Placement | None) -> tuple[list[int | SharedRef], list[memoryview]]:
    """Decide where each buffer travels: its refs, and the buffers that go inline."""
    refs: list[int | SharedRef] = []
    inline: list[memoryview] = []
    for buffer in buffers:
        parts = buffer_parts(buffer)
        size = sum(part.nbytes for part in parts)
        ref = placement.place(parts) if placement is not None and size else None
        if ref is None:
            refs.append(size)  # the reader reads this many bytes: the parts, one after another
            inline.extend(parts)
        else:
            refs.append(ref)
    return refs, inline


def encode_header(
    request_id: int,
    message: Message,
    refs: list[int | SharedRef],
    inline: list[Any],
    notes: dict[str, Any] | None = None,
) -> list[Buffer]:
    header = marshal.dumps((request_id, _TAG_OF[type(message)], tuple(message), refs, notes or {}))
    return [_HEADER_LENGTH.pack(len(header)) + header, *inline]


def decode_header(header: bytes) -> tuple[int, Message, list[int | SharedRef], dict[str, Any]]:
    """The header's parts; ProtocolError for anything that is not a header of this protocol.

    marshal trusts the counts it reads (the peer is the daemon or its own worker): garbage
    may make it allocate memory before it fails, but never yields anything but a header.
    """
    try:
        request_id, tag, fields, refs, notes = marshal.loads(header)
        if type(tag) is not int or tag < 0 or type(fields) is not tuple:
            raise TypeError(f"message tag {tag!r} with fields of type {type(fields).__name__}")
        message = _MESSAGE_TYPES[tag](*fields)
    except (ValueError, EOFError, TypeError, IndexError, MemoryError) as error:
        raise ProtocolError(f"malformed frame header: {error}") from error
    if type(request_id) is not int or type(notes) is not dict or type(refs) is not list:
        raise ProtocolError("malformed frame header: request id, buffer refs or notes of the wrong type")
    for ref in refs:
        if not (type(ref) is int and ref >= 0) and not _is_shared_ref(ref):
            raise ProtocolError(f"malformed frame header: buffer ref {ref!r}")
    return request_id, message, refs, notes


def _is_shared_ref(ref: Any) -> bool:
    return (
        type(ref) is tuple
        and len(ref) == 3
        and type(ref[0]) is str
        and type(ref[1]) is int
        and type(ref[2]) is int
        and ref[1] >= 0
        and ref[2] >= 0
    )


# ------------------------------------------------------------------ daemon side: asyncio streams


def _no_shared(ref: SharedRef) -> Any:
    raise ProtocolError(f"unexpected shared-memory reference {ref}")


async def read_frame_async(reader: asyncio.StreamReader, resolve: Callable[[SharedRef], Any] = _no_shared) -> Frame:
    """Read one frame; raises asyncio.IncompleteReadError at end of stream."""
    (header_length,) = _HEADER_LENGTH.unpack(await reader.readexactly(_HEADER_LENGTH.size))
    request_id, message, refs, notes = decode_header(await reader.readexactly(header_length))
    buffers = [await reader.readexactly(ref) if type(ref) is int else resolve(ref) for ref in refs]  # type: ignore[arg-type]
    return Frame(request_id, message, buffers, notes)


def write_frame_async(
    writer: asyncio.StreamWriter,
    request_id: int,
    message: Message,
    buffers: list[Buffer],
    placement: Placement | None = None,
    notes: dict[str, Any] | None = None,
) -> None:
    writer.writelines(encode_frame(request_id, message, buffers, placement, notes))


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


def read_frame_blocking(sock: socket.socket, resolve: Callable[[SharedRef], Any] = _no_shared) -> Frame:
    """Read one frame; raises EOFError when the daemon has closed the channel."""
    (header_length,) = _HEADER_LENGTH.unpack(_recv_exactly(sock, _HEADER_LENGTH.size))
    request_id, message, refs, notes = decode_header(bytes(_recv_exactly(sock, header_length)))
    buffers = [_recv_exactly(sock, ref) if type(ref) is int else resolve(ref) for ref in refs]  # type: ignore[arg-type]
    return Frame(request_id, message, buffers, notes)


def write_frame_blocking(sock: socket.socket, pieces: list[Buffer]) -> None:
    """Write a frame's pieces (from encode_frame); a small frame goes in one system call."""
    if sum(memoryview(piece).nbytes for piece in pieces) <= _SMALL_FRAME:
        sock.sendall(b"".join(pieces))
        return
    for piece in pieces:
        sock.sendall(piece)
