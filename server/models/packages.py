"""Package archives on the daemon's disk, each named by the SHA-256 of its bytes.

The store keeps its own copy of every archive (workers open it from there and a
replacement worker reopens the same bytes), so a package named by a server path is
copied in, and later changes to that file do not change what is loaded.

Before an archive is kept, its zip headers are read (nothing is inflated) and an archive
that would inflate past limits.max_package_unpacked_bytes, or to more than
limits.max_package_compression_ratio times its own size (a zip bomb), is refused. The
headers are what counts: both readers of an archive, zipfile here (server.models.weights) and
torch's in the worker, stop inflating an entry at the size its header gives.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import AsyncIterator, Iterator, NamedTuple

from server.errors import InvalidArgument, NotFound, PathNotAllowed, TooLarge

_READ_CHUNK = 1 << 20


class StoredPackage(NamedTuple):
    package_id: str
    path: str
    size_bytes: int


class PackageStore:
    def __init__(
        self,
        directory: Path,
        package_directory: Path,
        max_bytes: int,
        max_unpacked_bytes: int = 0,
        max_compression_ratio: float = 0.0,
        worker_group: int | None = None,
    ) -> None:
        """Limits of 0 are off. worker_group: workers run as another user of this group
        (worker.user), so the store and its archives are made readable to the group."""
        self._directory = directory  # the daemon's private copies
        self._package_directory = package_directory  # where server-side paths may point
        self._max_bytes = max_bytes
        self._max_unpacked_bytes = max_unpacked_bytes
        self._max_compression_ratio = max_compression_ratio
        self._worker_group = worker_group
        if worker_group is not None:
            os.chown(directory, -1, worker_group)
            os.chmod(directory, 0o750)

    async def save(self, chunks: AsyncIterator[bytes]) -> StoredPackage:
        """Write a streamed archive into the store; the same bytes always get the same id."""
        digest = hashlib.sha256()
        size = 0
        descriptor, temporary = tempfile.mkstemp(dir=self._directory, prefix="incoming-")
        try:
            if self._worker_group is not None:
                os.fchown(descriptor, -1, self._worker_group)
                os.fchmod(descriptor, 0o640)
            with os.fdopen(descriptor, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if self._max_bytes and size > self._max_bytes:
                        raise TooLarge(f"package exceeds the limit of {self._max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            if size == 0:
                raise InvalidArgument("the package is empty")
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._check_unpacked_size, temporary, size)
            return self._commit(temporary, digest.hexdigest(), size)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    async def import_server_path(self, path: str) -> StoredPackage:
        """Copy in an archive named by a path inside the package directory."""
        source = self.resolve_server_path(path)

        async def read_chunks() -> AsyncIterator[bytes]:
            loop = asyncio.get_running_loop()
            chunks = _read_file(source)
            while chunk := await loop.run_in_executor(None, next, chunks, b""):
                yield chunk

        return await self.save(read_chunks())

    def resolve_server_path(self, path: str) -> Path:
        return resolve_server_path(self._package_directory, path)

    def remove(self, package_id: str) -> None:
        (self._directory / f"{package_id}.pt").unlink(missing_ok=True)

    def _check_unpacked_size(self, path: str, size: int) -> None:
        """Refuse an archive whose entries inflate past the limits, from its headers alone.

        One that zipfile cannot read is left for the loader to refuse with its own message.
        """
        try:
            with zipfile.ZipFile(path) as archive:
                unpacked = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):  # e.g. "zip file version 16.4"
            return
        if self._max_unpacked_bytes and unpacked > self._max_unpacked_bytes:
            raise TooLarge(
                f"the package's entries inflate to {unpacked} bytes, over the limit of"
                f" {self._max_unpacked_bytes} (limits.max_package_unpacked_bytes)"
            )
        ratio = unpacked / size
        if self._max_compression_ratio and ratio > self._max_compression_ratio:
            raise TooLarge(
                f"the package's entries inflate to {unpacked} bytes from {size}, {ratio:.0f} times its size, over"
                f" the limit of {self._max_compression_ratio:g} (limits.max_package_compression_ratio)"
            )

    def _commit(self, temporary: str, package_id: str, size: int) -> StoredPackage:
        final = self._directory / f"{package_id}.pt"
        os.replace(temporary, final)
        return StoredPackage(package_id, str(final), size)


def resolve_server_path(package_directory: Path, path: str) -> Path:
    """A file named by a path inside the package directory; PathNotAllowed outside it."""
    if "\x00" in path:
        raise InvalidArgument(f"{path!r} is not a path: it holds a NUL character")
    root = package_directory.resolve()
    try:
        candidate = (root / path).resolve()  # follows symlinks, so they cannot lead outside
        if not candidate.is_relative_to(root):
            raise PathNotAllowed(f"{path!r} is outside the package directory")
        if not candidate.is_file():
            raise NotFound(f"no file {path!r} in the package directory")
    except (OSError, RuntimeError) as error:  # a name too long, a symlink loop
        raise NotFound(f"no file {path!r} in the package directory: {error}") from None
    return candidate


def _read_file(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as source:
        while chunk := source.read(_READ_CHUNK):
            yield chunk
