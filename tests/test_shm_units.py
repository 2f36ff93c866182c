"""Shared-memory pieces as units: arenas, weight staging, and what happens when /dev/shm is full."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from server.ipc import call_board, shm
from server.ipc.protocol import Gathered, place_buffers
from server.ipc.shm import Arena, Segment, SharedMemoryFull
from server.models import weights
from server.worker.shared import SharedWeightsReader, map_private


def no_room(*_: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_arena_places_large_buffers_and_reads_them_back() -> None:
    arena = Arena(threshold=16)
    try:
        data = memoryview(bytes(range(100)))
        assert arena.reserve(arena.wanted([data, b"small"]))
        assert arena.place([memoryview(b"small")]) is None  # below the threshold: inline
        ref = arena.place([data])
        assert ref is not None and ref[1] % 64 == 0
        assert arena.read(ref) == bytes(range(100))
        with pytest.raises(ValueError, match="outside the arena"):
            arena.read(("deployd-elsewhere-0", 0, 10))
    finally:
        arena.retire()


def test_a_gathered_buffer_is_laid_end_to_end_in_place() -> None:
    """A batch's tensor: its callers' parts copied straight into the arena, one after another."""
    arena = Arena(threshold=16)
    try:
        parts = [bytes(range(10)), b"", bytes(range(10, 40))]
        gathered = Gathered(parts)
        assert arena.wanted([gathered]) == 64
        assert arena.reserve(arena.wanted([gathered]))
        refs, inline = place_buffers([gathered, Gathered([b"ab", b"cd"])], arena)
        assert isinstance(refs[0], tuple) and arena.read(refs[0]) == bytes(range(40))
        assert refs[1] == 4 and b"".join(inline) == b"abcd"  # small: inline, the parts in order
    finally:
        arena.retire()


def test_arena_grows_and_unlinks_what_it_outgrew() -> None:
    arena = Arena(threshold=1)
    try:
        arena.reserve(1000)
        first = arena.segment
        assert first is not None and os.path.exists(f"/dev/shm/{first.name}")
        arena.reserve(first.size + 1)
        assert arena.segment is not None and arena.segment.size > first.size
        assert not os.path.exists(f"/dev/shm/{first.name}")
    finally:
        arena.retire()


def test_full_dev_shm_falls_back_to_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm.os, "posix_fallocate", no_room)
    with pytest.raises(SharedMemoryFull):
        Segment(1 << 20)
    arena = Arena(threshold=1)
    assert not arena.reserve(1 << 20)
    assert arena.place([memoryview(b"x" * 100)]) is None
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(f"deployd-{os.getpid()}-")]


def test_weights_are_staged_and_read_copy_on_write(tmp_path: Path) -> None:
    import torch
    from torch.package import PackageExporter, PackageImporter

    archive = tmp_path / "linear.pt"
    with PackageExporter(str(archive)) as exporter:
        exporter.save_pickle("model", "model.pkl", torch.nn.Linear(8, 4))
    staged = weights.stage_weights(str(archive))
    assert staged is not None
    try:
        importer = PackageImporter(str(archive))
        expected = importer.load_pickle("model", "model.pkl")
        reader = SharedWeightsReader(importer.zip_reader, staged.segment.name, staged.segment.size, staged.records)
        importer.zip_reader = reader
        reader.new_mapping()
        first = importer.load_pickle("model", "model.pkl")
        reader.new_mapping()
        second = importer.load_pickle("model", "model.pkl")
        assert torch.equal(first.weight, expected.weight)
        first.weight.data.mul_(0)  # a private copy of the written pages: the other replica is untouched
        assert torch.equal(second.weight, expected.weight)
        fresh = map_private(staged.segment.name, staged.segment.size)
        assert any(fresh[:64]), "the segment itself keeps the packaged weights"
        fresh.close()
    finally:
        staged.segment.unlink()


def test_weights_not_shared_when_dev_shm_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from torch.package import PackageExporter

    archive = tmp_path / "linear.pt"
    with PackageExporter(str(archive)) as exporter:
        exporter.save_pickle("model", "model.pkl", torch.nn.Linear(8, 4))
    monkeypatch.setattr(shm.os, "posix_fallocate", no_room)
    assert weights.stage_weights(str(archive)) is None


def test_the_call_board_row_carries_the_running_calls_label() -> None:
    """A data port's worker marks what it runs; the daemon reads it while it runs, and nothing
    once it ended or when a label is cut (the daemon names the call by the board's words)."""
    segment = Segment(call_board.board_bytes(2))
    try:
        row = call_board.WorkerRow(segment.name, 1)
        board = segment.buffer
        assert call_board.read_label(board, 1) == ()
        row.begin(0, 42, call_board.call_label("Invoke", "obj-00ff", "forward"))
        assert call_board.read_label(board, 1) == ("Invoke", "obj-00ff", "forward")
        assert call_board.read_label(board, 0) == ()  # the other slot's row is its own
        assert call_board.read_row(board, 1).call_id == 42
        row.end()
        assert call_board.read_label(board, 1) == ()
        row.begin(0, 0, call_board.call_label("Invoke", "obj-1", "m" * 200))
        kind, object_id, member = call_board.read_label(board, 1)
        assert (kind, object_id) == ("Invoke", "obj-1") and len(member) < 80
        row.end()
    finally:
        segment.close()
