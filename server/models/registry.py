"""What is loaded: registered modules, packages and objects, kept to replay into new workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from server.ipc import protocol
from server.models.placement import EVERYWHERE, Placement
from server.models.weights import SharedWeights


@dataclass(frozen=True)
class PackageRecord:
    package_id: str
    path: str
    size_bytes: int
    weights: SharedWeights | None = None

    def open_request(self) -> protocol.OpenPackage:
        if self.weights is None:
            return protocol.OpenPackage(self.package_id, self.path, "", 0, {})
        segment = self.weights.segment
        return protocol.OpenPackage(self.package_id, self.path, segment.name, segment.size, self.weights.records)


@dataclass(frozen=True)
class ObjectRecord:
    object_id: str
    package_id: str
    module: str
    file: str
    warmup: tuple[Any, ...] = ()  # LoadPickle's: run again in every new worker
    slots: tuple[int, ...] | None = None  # the worker slots it is loaded on; None: every one
    placement: Placement = EVERYWHERE  # as asked for (a new version of its name keeps it)

    def held_by(self, slot: int) -> bool:
        return self.slots is None or slot in self.slots


class ReplayKey(NamedTuple):
    kind: str  # "module", "package" or "object"
    name: str  # module name, package id or object id


class Registry:
    def __init__(self) -> None:
        self.modules: dict[str, str] = {}  # name -> source
        self.packages: dict[str, PackageRecord] = {}
        self.objects: dict[str, ObjectRecord] = {}

    def objects_of(self, package_id: str) -> list[ObjectRecord]:
        return [record for record in self.objects.values() if record.package_id == package_id]

    def replay_steps(self, slot: int) -> list[tuple[ReplayKey, protocol.Request]]:
        """The requests that bring a fresh worker in `slot` to the state of the one it
        replaces, each with the key of what it replays: the objects placed there only.

        Modules first (packages may extern them), then packages, then the objects
        unpickled from them, each group in the order it was loaded.
        """
        steps: list[tuple[ReplayKey, protocol.Request]] = [
            (ReplayKey("module", name), protocol.RegisterModule(name, source)) for name, source in self.modules.items()
        ]
        steps += [(ReplayKey("package", record.package_id), record.open_request()) for record in self.packages.values()]
        steps += [
            (
                ReplayKey("object", record.object_id),
                protocol.LoadPickle(record.object_id, record.package_id, record.module, record.file, record.warmup),
            )
            for record in self.objects.values()
            if record.held_by(slot)
        ]
        return steps
