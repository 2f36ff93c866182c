"""What is loaded: registered modules, packages and objects, kept to replay into new workers."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    device: str = "cpu"  # as asked for (server.models.devices)
    runs_on: str = "cpu"  # what the workers were told: cpu or cuda
    # GPU -> its keeper's handles of the weights (server.pool.keepers); {}: none kept
    shared: dict[int, dict[str, Any]] = field(default_factory=dict, hash=False, compare=False)

    def load_request(self, gpu: int = -1) -> protocol.LoadPickle:
        """The LoadPickle of a worker on `gpu` (-1: none): with that GPU's keeper's handles."""
        return protocol.LoadPickle(
            self.object_id, self.package_id, self.module, self.file, self.warmup, self.runs_on, self.shared.get(gpu, {})
        )

    def held_by(self, slot: int) -> bool:
        return self.slots is None or slot in self.slots


class ReplayKey(NamedTuple):
    kind: str  # "module", "package" or "object"
    name: str  # module name, package id or object id


class Registry:
    def __init__(self, slot_gpus: tuple[int, ...] = ()) -> None:
        """slot_gpus: each worker slot's GPU (pool.gpus), for the keepers' handles a replay carries."""
        self._slot_gpus = slot_gpus
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
                record.load_request(self._slot_gpus[slot] if slot < len(self._slot_gpus) else -1),
            )
            for record in self.objects.values()
            if record.held_by(slot)
        ]
        return steps
