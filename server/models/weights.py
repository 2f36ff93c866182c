"""Weights held once: a package's tensor storages, copied into one shared segment.

torch.package keeps every tensor storage as an uncompressed record `.data/<key>.storage`.
At LoadPackage the daemon copies those records (raw bytes, no torch needed) into one
segment and sends workers its name and an index; each worker's importer then builds
tensors on a copy-on-write mapping of that segment instead of reading the archive
(server.worker.shared). Every replica in every worker, and every replacement worker,
maps the same pages; a replica that writes to its weights gets private copies of the
pages it writes, so mutations stay local, as in torch::deploy.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from typing import Any, NamedTuple

from server.ipc.protocol import align
from server.ipc.shm import Segment, SharedMemoryFull

log = logging.getLogger(__name__)

# record name (relative to the archive root, as the importer asks for it) -> (offset, bytes)
WeightIndex = dict[str, tuple[int, int]]


class SharedWeights(NamedTuple):
    segment: Segment
    records: WeightIndex


def stage_weights(archive_path: str) -> SharedWeights | None:
    """Copy a package's storages into a new segment; None if it has none to share.

    A damaged archive raises zipfile.BadZipFile, whatever part of it is damaged.
    """
    try:
        return _stage_weights(archive_path)
    except (zlib.error, NotImplementedError, EOFError, RuntimeError, UnicodeDecodeError) as error:
        # zipfile's other ways of saying so: a compression it lacks, encryption, a bad stream.
        raise zipfile.BadZipFile(f"{type(error).__name__}: {error}") from error


def _stage_weights(archive_path: str) -> SharedWeights | None:
    with zipfile.ZipFile(archive_path) as archive:
        names = archive.namelist()
        root = names[0].split("/", 1)[0] if names else ""
        if _byte_order(archive, root) != "little":
            return None  # tensors would need swapping: leave them to torch's own loader
        records = [
            info
            for info in archive.infolist()
            if info.filename.startswith(f"{root}/.data/") and info.filename.endswith(".storage")
        ]
        if not records:
            return None
        index: WeightIndex = {}
        offset = 0
        for info in records:
            index[info.filename.split("/", 1)[1]] = (offset, info.file_size)
            offset = align(offset + info.file_size)
        try:
            segment = Segment(offset)
        except SharedMemoryFull as error:
            log.warning("weights of %s not shared: %s; each worker loads its own copy", archive_path, error)
            return None
        try:
            for info in records:
                start, size = index[info.filename.split("/", 1)[1]]
                # The view is released before unlink: one a traceback still held would keep the
                # mapping exported, and closing it would fail (BufferError) with the name left.
                with archive.open(info) as record, segment.buffer[start : start + size] as target:
                    _read_into(record, target)
        except BaseException:
            segment.unlink()
            raise
        segment.close()
        return SharedWeights(segment, index)


def _byte_order(archive: zipfile.ZipFile, root: str) -> str:
    try:
        return archive.read(f"{root}/byteorder").decode().strip()
    except KeyError:
        return "little"  # archives from before the record existed were written little-endian


# A ZipExtFile's readinto reads into a temporary bytes of the size asked for, then copies:
# asked for a whole record, the daemon would allocate (and, with server.malloc's settings,
# keep in the executor thread's heap) as much again as the package's largest tensor.
_READ_CHUNK = 1 << 20


def _read_into(record: Any, target: memoryview) -> None:
    filled = 0
    while filled < len(target):
        count = record.readinto(target[filled : filled + _READ_CHUNK])
        if not count:
            raise zipfile.BadZipFile("storage record shorter than its header says")
        filled += count
