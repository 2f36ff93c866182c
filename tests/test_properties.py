"""Properties of the value codec and the worker framing, checked on generated input (hypothesis).

The codec's whole path, without processes in between: a Python value goes to the wire
(client), is parsed by the daemon into a packed value and buffers, crosses the worker
protocol's header encoding, becomes torch objects in the worker, is packed again as a
result, goes back to the wire (daemon) and is read by the client. What goes in comes out,
bit for bit. The framing must meet garbage with ProtocolError or EOFError, nothing else.
"""

from __future__ import annotations

import math
import socket
import struct
from typing import Any

import numpy
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from client._values import from_wire, to_wire
from deployd_wire.proto import deployd_pb2 as pb
from server.api.values import pack_value, unpack_value
from server.errors import InvalidValue
from server.ipc import protocol
from server.worker.values import MAX_DEPTH, pack, unpack
from tests.test_values import DTYPES  # every dtype the wire carries

# Modest counts: the whole file runs in a few seconds; `make fuzz` runs the live fuzz longer.
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# ------------------------------------------------------------------ the path under test


def round_trip(value: Any) -> Any:
    """client -> wire -> daemon -> worker (torch objects) -> daemon -> wire -> client."""
    request = pb.InvokeRequest(object_id="obj")
    to_wire(value, request.args.add())
    parsed = pb.InvokeRequest.FromString(request.SerializeToString())  # what gRPC hands the daemon
    buffers: list[Any] = []
    args = [unpack_value(item, buffers) for item in parsed.args]
    # The daemon -> worker frame: the header is marshal, the tensor bytes follow inline.
    pieces = protocol.encode_frame(1, protocol.Invoke("obj", "__call__", args, {}), buffers)
    _, message, refs, _ = protocol.decode_header(bytes(pieces[0])[4:])
    assert isinstance(message, protocol.Invoke)
    assert refs == [memoryview(piece).nbytes for piece in pieces[1:]]
    in_worker = unpack(message.args, [bytearray(piece) for piece in pieces[1:]])[0]
    result_buffers: list[Any] = []
    packed = pack(in_worker, result_buffers)
    response = pb.InvokeResponse()
    pack_value(packed, result_buffers, response.result)
    return from_wire(pb.InvokeResponse.FromString(response.SerializeToString()).result)


def tensor_bits(tensor: torch.Tensor) -> bytes:
    """The bytes of what a tensor reads as: C order, conj and neg views resolved."""
    if tensor.numel() == 0:
        return b""
    dense = torch.empty(tensor.numel(), dtype=tensor.dtype)
    dense.copy_(tensor.detach().resolve_conj().resolve_neg().reshape(-1))
    return bytes(dense.view(torch.uint8).tolist())


def assert_same(got: Any, expected: Any, where: str = "value") -> None:
    """Equal, with the same types at every level; floats and tensors compared bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got)}"
        assert (got.dtype, tuple(got.shape)) == (expected.dtype, tuple(expected.shape)), where
        assert tensor_bits(got) == tensor_bits(expected), where
        return
    if isinstance(expected, numpy.ndarray):
        assert_same(got, torch.from_numpy(expected.copy()), where)
        return
    if isinstance(expected, (bytearray, memoryview)):
        expected = bytes(expected)
    assert type(got) is type(expected), f"{where}: {type(got)} is not {type(expected)}"
    if isinstance(expected, float):
        assert struct.pack("<d", got) == struct.pack("<d", expected), f"{where}: {got!r} != {expected!r}"
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for index, (got_item, item) in enumerate(zip(got, expected, strict=True)):
            assert_same(got_item, item, f"{where}[{index}]")
    elif isinstance(expected, dict):
        assert list(got) == list(expected), f"{where}: keys {list(got)} != {list(expected)}"
        for key, item in expected.items():
            assert type(next(k for k in got if k == key)) is type(key)
            assert_same(got[key], item, f"{where}[{key!r}]")
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


# ------------------------------------------------------------------ strategies


@st.composite
def dense_tensors(draw: st.DrawFn, max_dims: int = 4) -> torch.Tensor:
    """Any dtype the wire carries, shapes from 0-d to 4-d with empty ones, any bit pattern."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=max_dims))
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    data = bytearray(draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize)))
    if dtype == torch.bool:
        data = bytearray(byte & 1 for byte in data)  # a bool is 0 or 1; other bytes are not bools
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Dense tensors and views of them: transposed, strided, broadcast, conjugated, negated."""
    tensor = draw(dense_tensors())
    for _ in range(draw(st.integers(0, 2))):
        view = draw(st.sampled_from(["transpose", "step", "expand", "conj", "neg", "permute", "grad"]))
        if view == "transpose" and tensor.dim() >= 2:
            tensor = tensor.transpose(0, -1)
        elif view == "step" and tensor.dim() >= 1:
            tensor = tensor[..., ::2]
        elif view == "expand":
            tensor = tensor.unsqueeze(0).expand(2, *tensor.shape)
        elif view == "conj" and tensor.is_complex():
            tensor = tensor.conj()
        elif view == "neg" and tensor.dtype not in (torch.bool, torch.uint8) and not tensor.is_conj():
            tensor = torch._neg_view(tensor)
        elif view == "permute" and tensor.dim() >= 3:
            tensor = tensor.permute(*range(1, tensor.dim()), 0)
        elif view == "grad" and tensor.is_floating_point() and not tensor.is_neg():
            tensor = tensor.clone().requires_grad_()
    return tensor


int64s = st.integers(INT64_MIN, INT64_MAX)
scalars = (
    st.none()
    | st.booleans()
    | int64s
    | st.sampled_from([INT64_MIN, INT64_MAX, 0, -1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, -0.0, 5e-324])
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
dict_keys = st.text(max_size=8) | int64s
values = st.recursive(
    scalars | tensors(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(dict_keys, children, max_size=4)
    ),
    max_leaves=12,
)


# ------------------------------------------------------------------ codec properties


@QUICK
@given(values)
def test_every_value_comes_back_as_it_went(value: Any) -> None:
    assert_same(round_trip(value), value)


@QUICK
@given(tensors())
def test_every_tensor_comes_back_dense_with_the_values_it_read_as(tensor: torch.Tensor) -> None:
    got = round_trip(tensor)
    assert got.is_contiguous() and not got.is_conj() and not got.is_neg() and not got.requires_grad
    assert_same(got, tensor)


def result_of_model(value: Any) -> Any:
    """What the client reads when model code returns value (the worker packs it as it is)."""
    buffers: list[Any] = []
    response = pb.InvokeResponse()
    pack_value(pack(value, buffers), buffers, response.result)
    return from_wire(pb.InvokeResponse.FromString(response.SerializeToString()).result)


@QUICK
@given(tensors())
def test_every_tensor_a_model_returns_arrives_as_it_reads(tensor: torch.Tensor) -> None:
    assert_same(result_of_model(tensor), tensor)


@pytest.mark.parametrize(
    "view",
    [
        torch.zeros(2, dtype=torch.bfloat16)[::2],
        torch.zeros(2, dtype=torch.complex64)[::2].conj(),
        torch.ones(3, 1, dtype=torch.bfloat16).t()[:, :1],
    ],
    ids=["bfloat16-step", "conj-step", "bfloat16-column"],
)
def test_one_element_views_a_model_returns(view: torch.Tensor) -> None:
    assert_same(result_of_model(view), view)


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.sampled_from([numpy.float16, numpy.float32, numpy.float64, numpy.int8, numpy.int16, numpy.int32])
    | st.sampled_from([numpy.int64, numpy.uint8, numpy.bool_, numpy.complex64, numpy.complex128]),
    st.lists(st.integers(0, 4), max_size=3),
    st.booleans(),
)
def test_numpy_arrays_come_back_as_tensors(dtype: Any, shape: list[int], reverse: bool) -> None:
    array = (numpy.arange(math.prod(shape)) % 7).astype(dtype).reshape(shape)
    if reverse and array.ndim:
        array = array[..., ::-1]  # negative strides
    assert_same(round_trip(array), array)


@settings(max_examples=40, deadline=None, database=None)
@given(st.integers(0, MAX_DEPTH), st.sampled_from(["list", "tuple", "dict"]))
def test_nesting_up_to_the_limit_comes_back(depth: int, container: str) -> None:
    """Every depth the limit allows, protobuf parses both ways (a dict level is 3 messages)."""
    value: Any = 1
    for _ in range(depth):
        value = {"k": value} if container == "dict" else [value] if container == "list" else (value,)
    assert_same(round_trip(value), value)


# ------------------------------------------------------------------ the daemon's parser of wire values

DTYPE_NUMBERS = st.integers(-3, 20)


@st.composite
def wire_tensors(draw: st.DrawFn) -> pb.Tensor:
    """Tensors as any client might send them: bad dtypes, negative or huge shapes, wrong lengths."""
    tensor = pb.Tensor()
    tensor.dtype = draw(DTYPE_NUMBERS)  # type: ignore[assignment]
    tensor.shape.extend(draw(st.lists(st.integers(-2, 6) | st.sampled_from([2**31, 2**62, INT64_MAX]), max_size=4)))
    tensor.data = draw(st.binary(max_size=64))
    return tensor


def wire_values(max_leaves: int = 10) -> st.SearchStrategy[pb.Value]:
    leaf = st.one_of(
        st.just(pb.Value()),  # no kind set
        st.none().map(lambda _: pb.Value(none_value=pb.NONE_VALUE)),
        int64s.map(lambda n: pb.Value(int_value=n)),
        st.text(max_size=5).map(lambda s: pb.Value(string_value=s)),
        wire_tensors().map(lambda t: pb.Value(tensor_value=t)),
    )

    def containers(children: st.SearchStrategy[pb.Value]) -> st.SearchStrategy[pb.Value]:
        def as_list(items: list[pb.Value], tuple_: bool) -> pb.Value:
            value = pb.Value()
            target = value.tuple_value if tuple_ else value.list_value
            target.SetInParent()
            target.items.extend(items)
            return value

        def as_dict(entries: list[tuple[int, str | int, pb.Value]]) -> pb.Value:
            value = pb.Value()
            value.dict_value.SetInParent()
            for key_kind, key, item in entries:
                entry = value.dict_value.entries.add(value=item)
                if key_kind == 1 and isinstance(key, str):
                    entry.string_key = key
                elif key_kind == 2 and isinstance(key, int):
                    entry.int_key = key
            return value

        return st.one_of(
            st.builds(as_list, st.lists(children, max_size=3), st.booleans()),
            st.builds(as_dict, st.lists(st.tuples(st.integers(0, 2), dict_keys, children), max_size=3)),
        )

    return st.recursive(leaf, containers, max_leaves=max_leaves)


@QUICK
@given(wire_values())
def test_the_daemon_takes_a_wire_value_or_says_why_not(value: pb.Value) -> None:
    buffers: list[Any] = []
    try:
        packed = unpack_value(value, buffers)
    except InvalidValue as error:
        assert str(error)
        return
    # What it takes, it can send back, and that parses to the same packed value
    # (not to the same message: a dict with a repeated key keeps its last entry).
    out = pb.Value()
    pack_value(packed, buffers, out)
    again: list[Any] = []
    assert unpack_value(out, again) == packed
    assert [bytes(buffer) for buffer in again] == [bytes(buffer) for buffer in buffers]
    # And a worker can build torch objects from it.
    unpack(packed, [bytearray(buffer) for buffer in buffers])


# ------------------------------------------------------------------ the worker protocol's framing


def sample_frames() -> list[bytes]:
    messages: list[tuple[protocol.Message, list[bytes]]] = [
        (
            protocol.Invoke("obj-1", "__call__", [("tensor", "float32", [2], 0), ("tuple", [1, "x"])], {"k": None}),
            [b"\x01" * 8],
        ),
        (protocol.LoadPickle("obj-2", "pkg", "models", "echo.pkl"), []),
        (protocol.OpenPackage("pkg", "/tmp/p.pt", "deployd-1", 128, {"data/0": (0, 64)}), []),
        (protocol.Result({"a": [1.5, b"yz", ("tensor", "int64", [], 0)]}), [b"\x02" * 8]),
        (protocol.Failure(protocol.FAILURE_MODEL_ERROR, "ValueError", "no", "Traceback ..."), []),
    ]
    return [
        b"".join(bytes(piece) for piece in protocol.encode_frame(7, message, buffers, notes={"times": (1, 2)}))  # type: ignore[arg-type]
        for message, buffers in messages
    ]


FRAMES = sample_frames()


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame with bytes flipped, inserted or removed, or cut short; the length prefix
    is left alone or set to at most the bytes that follow plus a little (never gigabytes)."""
    frame = bytearray(draw(st.sampled_from(FRAMES)))
    for _ in range(draw(st.integers(0, 4))):
        operation = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        position = draw(st.integers(4, max(4, len(frame) - 1)))
        if operation == "flip" and position < len(frame):
            frame[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set" and position < len(frame):
            frame[position] = draw(st.integers(0, 255))
        elif operation == "insert":
            frame[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif operation == "delete":
            del frame[position : position + draw(st.integers(1, 4))]
    if draw(st.booleans()):
        frame[:4] = struct.pack("<I", draw(st.integers(0, len(frame) + 16)))
    return bytes(frame[: draw(st.integers(0, len(frame)))] if draw(st.booleans()) else frame)


def allocates_past_its_size(header: bytes) -> bool:
    """Whether marshal would allocate for this header more than the header could hold.

    marshal trusts the counts it reads: a tuple, list or set count, or an int's digit count,
    is allocated before a single item is read, so a few flipped bytes can ask for gigabytes
    (the daemon trusts its workers, and they it). This walks marshal's format (version 4)
    far enough to find such a count; code objects count as suspect too.
    """
    fixed = {**dict.fromkeys(b"0NFTS.", 0), ord("i"): 4, ord("r"): 4, ord("g"): 8, ord("y"): 16}
    position = 0

    def walk(depth: int) -> bool:
        nonlocal position
        if position >= len(header):
            return False
        code = header[position] & 0x7F
        position += 1
        left = len(header) - position
        if code in fixed:
            position += fixed[code]
            return False
        if code in b"stuaA([<>l":
            if left < 4:
                return False
            (count,) = struct.unpack_from("<i", header, position)
            position += 4
            if code == ord("l"):
                position += 2 * abs(count)
                return 2 * abs(count) > left
            if code in b"stuaA":
                position += max(count, 0)
                return False
            return count > left or depth > 100 or any(walk(depth + 1) for _ in range(max(count, 0)))
        if code == ord(")"):
            count = header[position] if left else 0
            position += 1
            return depth > 100 or any(walk(depth + 1) for _ in range(count))
        if code in b"zZ":
            position += 1 + (header[position] if left else 0)
            return False
        if code == ord("{"):
            while position < len(header) and header[position] & 0x7F != ord("0"):
                if depth > 100 or walk(depth + 1) or walk(depth + 1):
                    return True
            position += 1
            return False
        return code == ord("c")  # else an unknown code: marshal refuses it at once

    return walk(0)


def inline_bytes_claimed(frame: bytes) -> int:
    """What the frame's refs ask the reader to allocate, or 0 when its header does not decode."""
    (length,) = struct.unpack("<I", frame[:4].ljust(4, b"\x00"))
    try:
        _, _, refs, _ = protocol.decode_header(frame[4 : 4 + length])
    except protocol.ProtocolError:
        return 0
    return sum(ref for ref in refs if type(ref) is int)


@settings(max_examples=300, deadline=None, database=None)
@given(mutated_frames())
def test_a_mutated_frame_is_read_or_refused_as_a_protocol_error(frame: bytes) -> None:
    # The reader trusts a decoded length enough to allocate it (the daemon is its only peer);
    # what this checks is that it never fails in any other way than the two errors it names.
    assume(not allocates_past_its_size(frame[4:]) and inline_bytes_claimed(frame) < 1 << 20)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(frame)
        ours.shutdown(socket.SHUT_WR)
        try:
            read = protocol.read_frame_blocking(theirs)
        except (protocol.ProtocolError, EOFError):
            return
    assert isinstance(read.message, protocol._MESSAGE_TYPES)
    assert isinstance(read.request_id, int) and isinstance(read.notes, dict)
    assert all(isinstance(buffer, bytearray) for buffer in read.buffers)


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=200) | mutated_frames().map(lambda frame: frame[4:]))
def test_decode_header_refuses_garbage_as_a_protocol_error(header: bytes) -> None:
    assume(not allocates_past_its_size(header))
    try:
        request_id, message, refs, notes = protocol.decode_header(header)
    except protocol.ProtocolError:
        return
    assert type(request_id) is int and isinstance(message, protocol._MESSAGE_TYPES)
    assert type(notes) is dict and type(refs) is list
    for ref in refs:
        assert (type(ref) is int and ref >= 0) or (
            type(ref) is tuple and len(ref) == 3 and type(ref[0]) is str and ref[1] >= 0 and ref[2] >= 0
        ), ref


@pytest.mark.parametrize("frame", FRAMES, ids=range(len(FRAMES)))
def test_every_prefix_of_a_frame_is_end_of_file(frame: bytes) -> None:
    for end in range(len(frame)):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.sendall(frame[:end])
            ours.shutdown(socket.SHUT_WR)
            with pytest.raises(EOFError):
                protocol.read_frame_blocking(theirs)
