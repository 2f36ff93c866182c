"""The worker protocol's framing and the worker's value packing, as units."""

from __future__ import annotations

import socket

import pytest
import torch

from server.ipc import protocol
from server.worker.values import pack, unpack


def test_frame_round_trip_over_a_socket() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        message = protocol.Invoke("obj-1", "__call__", [("tensor", "float32", [2], 0)], {"k": ("tuple", [1])})
        protocol.write_frame_blocking(ours, protocol.encode_frame(7, message, [b"\x00" * 8], notes={"n": 1}))
        frame = protocol.read_frame_blocking(theirs)
    assert frame.request_id == 7
    assert frame.message == message
    assert [bytes(buffer) for buffer in frame.buffers] == [b"\x00" * 8]
    assert frame.notes == {"n": 1}


def test_closed_channel_is_end_of_file() -> None:
    ours, theirs = socket.socketpair()
    ours.close()
    with theirs, pytest.raises(EOFError):
        protocol.read_frame_blocking(theirs)


def test_malformed_header_is_a_protocol_error() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_header(b"not marshal")


def test_pack_and_unpack_keep_structure_and_share_tensor_memory() -> None:
    value = {"t": (torch.arange(6).reshape(2, 3), [None, 1.5]), 3: b"x"}
    buffers: list[object] = []
    packed = pack(value, buffers)
    assert packed["t"][0] == "tuple"
    wire_buffers = [bytearray(buffer) for buffer in buffers]  # type: ignore[arg-type]
    rebuilt = unpack(packed, wire_buffers)
    assert torch.equal(rebuilt["t"][0], value["t"][0])  # type: ignore[index]
    assert rebuilt["t"][1] == [None, 1.5] and rebuilt[3] == b"x"
    rebuilt["t"][0][0, 0] = 100  # the tensor wraps the received buffer: no copy on the way in
    assert wire_buffers[0][:8] == (100).to_bytes(8, "little")


@pytest.mark.parametrize(
    ("value", "message"), [(object(), "cannot be sent"), (2**70, "int64"), ({1.5: 1}, "dict keys")]
)
def test_pack_refuses_what_the_wire_cannot_carry(value: object, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        pack(value, [])
