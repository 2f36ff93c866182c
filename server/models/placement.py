"""Where a model lives: on every worker (the default), on N workers the daemon picks, or on
named worker slots (a model entry's `workers:`, LoadPickle's workers / worker_slots).

    Placement (asked for) ──> choose_slots(pool size, what each slot holds) ──> the slots, or None (every)

N workers are the N slots holding the fewest placed objects, ties to the lowest index, so two
models of `workers: 1` land on different slots and the choice is the same on every start.
Imports no grpc.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from server.errors import InvalidArgument


@dataclass(frozen=True)
class Placement:
    """count: that many workers, chosen by the daemon; slots: those slots. Neither: every worker."""

    count: int = 0
    slots: tuple[int, ...] = ()

    @property
    def everywhere(self) -> bool:
        return not self.count and not self.slots

    def describe(self) -> str:
        if self.slots:
            return f"worker slots {', '.join(map(str, self.slots))}"
        return f"{self.count} workers" if self.count else "every worker"

    def checked(self, pool_size: int) -> Placement:
        """Itself, if the pool can hold it; InvalidArgument says why not."""
        if self.count and self.slots:
            raise InvalidArgument("give a number of workers or a list of worker slots, not both")
        if self.count < 0:
            raise InvalidArgument(f"workers must be at least 1, got {self.count}")
        if self.count > pool_size:
            raise InvalidArgument(f"workers: {self.count} is more than the pool's {pool_size} workers")
        if len(set(self.slots)) != len(self.slots):
            raise InvalidArgument(f"worker slots are listed twice: {list(self.slots)}")
        bad = [slot for slot in self.slots if not 0 <= slot < pool_size]
        if bad:
            raise InvalidArgument(
                f"there is no worker slot {bad[0]}: the pool has slots 0 to {pool_size - 1} (pool.workers)"
            )
        return self


EVERYWHERE = Placement()


def parse_placement(raw: Any) -> Placement:
    """A config value: a positive integer (that many workers) or a non-empty list of slots."""
    if type(raw) is int:
        if raw < 1:
            raise InvalidArgument(f"workers must be at least 1 (or a list of worker slots), got {raw}")
        return Placement(count=raw)
    if isinstance(raw, list) and raw and all(type(slot) is int for slot in raw):
        if any(slot < 0 for slot in raw) or len(set(raw)) != len(raw):
            raise InvalidArgument(f"worker slots must be distinct indexes from 0, got {raw!r}")
        return Placement(slots=tuple(sorted(raw)))
    raise InvalidArgument(f"workers must be a number of workers or a list of worker slots, got {raw!r}")


def choose_slots(
    placement: Placement, pool_size: int, held: Iterable[Iterable[int]], among: tuple[int, ...] | None = None
) -> tuple[int, ...] | None:
    """The slots to load on (None: every worker). held: the slots of each object already placed.
    among: the slots it may use at all (its device's: server.models.devices); None: any."""
    placement.checked(pool_size)
    if among is not None:
        return _choose_among(placement, among, held)
    if placement.slots:
        return placement.slots
    if not placement.count:
        return None
    load = [0] * pool_size
    for slots in held:
        for slot in slots:
            if 0 <= slot < pool_size:
                load[slot] += 1
    chosen = sorted(range(pool_size), key=lambda slot: (load[slot], slot))[: placement.count]
    return tuple(sorted(chosen))


def _choose_among(placement: Placement, among: tuple[int, ...], held: Iterable[Iterable[int]]) -> tuple[int, ...]:
    if placement.slots:
        outside = [slot for slot in placement.slots if slot not in among]
        if outside:
            raise InvalidArgument(
                f"worker slot {outside[0]} is not on the model's device: its workers are slots"
                f" {', '.join(map(str, among))}"
            )
        return placement.slots
    if not placement.count:
        return among
    if placement.count > len(among):
        raise InvalidArgument(f"workers: {placement.count} is more than the {len(among)} workers on the model's device")
    load = dict.fromkeys(among, 0)
    for slots in held:
        for slot in slots:
            if slot in load:
                load[slot] += 1
    chosen = sorted(among, key=lambda slot: (load[slot], slot))[: placement.count]
    return tuple(sorted(chosen))
