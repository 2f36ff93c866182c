"""The model repository: the config's `models:`, served by name, loaded at start and on reload.

At start every entry is loaded (package from packages.directory, then its pickle under the
entry's name) before the daemon serves; one that cannot load stops the start
(ModelLoadFailed: exit 2) unless models_on_error is "continue", when its error is kept for
Status and health. A reload compares the new list with what it loaded: new names load,
changed entries (another package, pickle or warmup, or its package or warmup file changed
on disk) hot-swap to a new version, removed names unload, unchanged ones are left alone; one
that fails stays as it was. A package the repository loaded and no entry uses any more is
unloaded once its last version has drained. A model's warmup (server.models.warmup) runs
inside its load: it serves once every worker ran it.

Imports no grpc: the daemon (SIGHUP) and the servicer (Reload) call it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import DeploydError, NotFound
from server.models.entry import ModelEntry
from server.models.service import ModelService
from server.models.warmup import warmup_message

log = logging.getLogger(__name__)


class ModelLoadFailed(Exception):
    """A model of the repository could not load at start (and models_on_error is "stop")."""


@dataclass
class ReloadReport:
    loaded: list[str] = field(default_factory=list)  # names new to the daemon
    swapped: list[str] = field(default_factory=list)  # names now serving a new version
    unloaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> why; the name is as it was


@dataclass(frozen=True)
class _Loaded:
    entry: ModelEntry
    package_id: str
    file_stamp: tuple[int, ...]  # the package file's (size, mtime_ns) when loaded, and its warmup file's


class ModelRepository:
    def __init__(self, service: ModelService, package_directory: Path) -> None:
        self._service = service
        self._package_directory = package_directory
        self._loaded: dict[str, _Loaded] = {}
        self._packages: set[str] = set()  # every package the repository loaded and has not released
        self.errors: dict[str, str] = {}  # name -> why it could not load (models_on_error: continue)
        self._entries: dict[str, ModelEntry] = {}  # the config's models:, as last loaded or reloaded
        # Loaded by name through KServe v2's RepositoryModelLoad with an entry of their own: served
        # like a name loaded at run time (a reload leaves them alone; a restart forgets them).
        self._runtime: dict[str, ModelEntry] = {}

    @property
    def names(self) -> list[str]:
        return list(self._loaded)

    def entry(self, name: str) -> ModelEntry | None:
        """The entry a name was loaded from (its declared inputs and outputs), if any."""
        return self._runtime.get(name) or self._entries.get(name)

    @property
    def entries(self) -> list[ModelEntry]:
        """The config's entries, then those loaded at run time."""
        return [*self._entries.values(), *(e for name, e in self._runtime.items() if name not in self._entries)]

    async def load_by_name(self, name: str, entry: ModelEntry | None = None) -> None:
        """Load (or reload) one model by name: the config's entry for it, or the entry given.

        An unchanged config entry that is served stays as it is; a changed one (or a given
        entry) loads a new version, served once loaded. NotFound when neither entry exists.
        """
        if entry is None:
            entry = self._entries.get(name)
            if entry is None:
                raise NotFound(
                    f"no model {name!r} in the model repository (the config's models:);"
                    " give its package and pickle to load it by that name"
                )
            if self._serves_as_loaded(entry):
                return
            await self._load(entry)
            self._runtime.pop(name, None)
            await self._release_unused_packages()
            return
        loaded_before = {package.package_id for package in self._service.status().packages}
        warmup = await self._warmup_message(entry)
        package = await self._service.load_package_path(entry.package)
        try:
            await self._load_pickle(package.package_id, entry, warmup)
        finally:
            if package.package_id not in loaded_before:
                # Loaded for this model alone: it goes once the model's last version has.
                await self._service.release_package_when_unused(package.package_id)
        self._runtime[name] = entry

    async def unload_by_name(self, name: str) -> None:
        """Unload every version of a name; a config entry stays unloaded until loaded or reloaded."""
        await self._service.unload_object(name)
        self._runtime.pop(name, None)

    async def load_all(self, entries: tuple[ModelEntry, ...], on_error: str) -> None:
        """Load every entry before the daemon serves."""
        self._entries = {entry.name: entry for entry in entries}
        for entry in entries:
            try:
                await self._load(entry)
            except DeploydError as error:
                why = f"model {entry.name!r} ({entry.package}, {entry.module}:{entry.file}) cannot load: {error}"
                if on_error == "stop":
                    raise ModelLoadFailed(f"{why} (models_on_error: continue would start without it)") from error
                log.error("%s; serving without it", why)
                self.errors[entry.name] = str(error)

    async def reload(self, entries: tuple[ModelEntry, ...]) -> ReloadReport:
        """Bring what is served in line with entries; each name changes alone, all or nothing."""
        report = ReloadReport()
        wanted = {entry.name: entry for entry in entries}
        self._entries = dict(wanted)
        for name in [name for name in self._loaded if name not in wanted]:
            try:
                await self._service.unload_object(name)
            except NotFound:
                pass  # already gone (unloaded by hand, or its package was)
            except DeploydError as error:
                report.failed[name] = f"cannot unload: {error}"
                continue
            del self._loaded[name]
            report.unloaded.append(name)
        for name in [name for name in self.errors if name not in wanted]:
            del self.errors[name]
        for entry in entries:
            current = self._loaded.get(entry.name)
            served = entry.name in self._service.served_names()  # (it may have been unloaded by hand)
            if self._serves_as_loaded(entry):
                report.unchanged.append(entry.name)
                continue
            try:
                await self._load(entry)
            except DeploydError as error:
                report.failed[entry.name] = str(error)
                if current is None:
                    self.errors[entry.name] = str(error)
                continue
            (report.swapped if served else report.loaded).append(entry.name)
        await self._release_unused_packages()
        for name, why in report.failed.items():
            log.error("reload: model %r left as it was: %s", name, why)
        log.info(
            "reload: %d loaded, %d swapped, %d unloaded, %d unchanged, %d failed",
            *(len(names) for names in (report.loaded, report.swapped, report.unloaded, report.unchanged)),
            len(report.failed),
        )
        return report

    async def _load_pickle(self, package_id: str, entry: ModelEntry, warmup: tuple[Any, ...]) -> None:
        """The entry's pickle from its loaded package, as the entry says to serve it."""
        await self._service.load_pickle(
            package_id, entry.module, entry.file, entry.name, entry.batching, entry.workers, warmup, entry.device
        )

    async def _load(self, entry: ModelEntry) -> None:
        stamp = self._stamp(entry)
        warmup = await self._warmup_message(entry)
        package = await self._service.load_package_path(entry.package)
        try:
            await self._load_pickle(package.package_id, entry, warmup)
        except DeploydError:
            if package.package_id not in self._packages:  # loaded for this entry alone: not kept
                await self._service.release_package_when_unused(package.package_id)
            raise
        self._loaded[entry.name] = _Loaded(entry, package.package_id, stamp)
        self._packages.add(package.package_id)
        self.errors.pop(entry.name, None)

    async def _warmup_message(self, entry: ModelEntry) -> tuple[Any, ...]:
        """The entry's warmup as the load carries it: its inputs file read (in a thread: it is disk)."""
        return await asyncio.to_thread(warmup_message, entry.warmup, self._package_directory)

    def _serves_as_loaded(self, entry: ModelEntry) -> bool:
        """The name is served from exactly this entry, its package file unchanged on disk."""
        current = self._loaded.get(entry.name)
        unchanged = current is not None and current.entry == entry and current.file_stamp == self._stamp(entry)
        return unchanged and entry.name in self._service.served_names()

    def _stamp(self, entry: ModelEntry) -> tuple[int, ...]:
        warmup_file = entry.warmup.file if entry.warmup is not None else ""
        return _file_stamp(self._package_directory / entry.package) + (
            _file_stamp(self._package_directory / warmup_file) if warmup_file else ()
        )

    async def _release_unused_packages(self) -> None:
        in_use = {loaded.package_id for loaded in self._loaded.values()}
        for package_id in self._packages - in_use:
            await self._service.release_package_when_unused(package_id)
        self._packages = in_use


def _file_stamp(path: Path) -> tuple[int, int]:
    """(size, mtime_ns): a file changed on disk has another; (-1, -1) for none."""
    try:
        status = os.stat(path)
    except OSError:
        return (-1, -1)
    return (status.st_size, status.st_mtime_ns)
