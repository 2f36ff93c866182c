"""The cancel board: where the daemon tells a worker that the caller of its running call gave up.

    daemon (WorkerHandle.abandon)                     worker slot i (deployd_worker.cancelled())
    flag(i, request id) ──> word i = request id  <─── reads word i == its running request's id

One shared-memory segment the daemon creates (server.ipc.shm.Segment), one aligned 8-byte
word per worker slot; the daemon writes, workers only read (a whole aligned word is seen at
once). Request ids are never reused in a daemon's life (server.pool.worker_handle), so the
word needs no clearing: what a slot's earlier call or earlier worker left there can never
match the request that runs now. Reading it costs model code no system call, so it can ask
in a tight loop.
"""

from __future__ import annotations

import contextlib
import mmap
import os

from server.ipc.shm import SHM_DIRECTORY, Segment

WORD_BYTES = 8


class CancelBoard:
    """The daemon's end: one word per slot."""

    def __init__(self, slots: int) -> None:
        self.segment = Segment(max(slots, 1) * WORD_BYTES)
        self._words = self.segment.buffer.cast("q")

    @property
    def name(self) -> str:
        return self.segment.name

    def flag(self, slot: int, request_id: int) -> None:
        """The caller of request_id, running in slot, gave up."""
        with contextlib.suppress(ValueError):  # unlinked: the daemon is stopping, and so are its workers
            self._words[slot] = request_id

    def unlink(self) -> None:
        self._words.release()
        self.segment.unlink()


def map_slot_word(segment_name: str, slot: int, directory: str = SHM_DIRECTORY) -> memoryview:
    """A worker's own word of the board (read only), for deployd_worker's Call."""
    descriptor = os.open(os.path.join(directory, segment_name), os.O_RDONLY)
    try:
        mapping = mmap.mmap(descriptor, 0, prot=mmap.PROT_READ)
    finally:
        os.close(descriptor)
    return memoryview(mapping)[slot * WORD_BYTES : (slot + 1) * WORD_BYTES].cast("q")
