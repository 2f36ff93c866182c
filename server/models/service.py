"""The daemon's domain API: load, call and unload, over the pool, the store and the registry.

    load, unload ──> under the supervisor's `changes`: dispatcher.broadcast (every worker) ──> registry
    invoke, has_attr, load_resource ──> (a batcher ──>) dispatcher.call (one free worker)
    a new worker ──> prepare_worker (the supervisor holds `changes`): the registry replayed into it

An object may be placed (server.models.placement): loaded on some worker slots only, its calls
routed to those only, and replayed only into a replacement in one of them. A new version of a
name keeps the placement (and the slots) of the version it replaces unless given another.

Everything that changes what the workers hold runs under `supervisor.changes` and is all or
nothing: if any worker fails, the workers that succeeded are told to undo it and the
registry is left as it was. Imports no grpc.

Models served by name (server.models.names) are objects too: loading a name again adds a
version that serves new calls at once, and the version it replaced is unloaded when the
last call running on it ends (`_in_flight` counts them), so a swap fails no call.

A load that kills workers fails like any other (the supervisor replaces them and replays only
what is still loaded). Something that loaded fine but whose replay kills new workers
(it depends on state a fresh worker lacks) is evicted after _REPLAY_STRIKES such deaths
in a row, so the pool recovers instead of restarting workers forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import secrets
import zipfile
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, AsyncIterator, NamedTuple

from server import tracing
from server.batching.batcher import Batcher, BatchObserver, BatchPolicy
from server.batching.batcher import Pool as BatchPool
from server.errors import (
    DeploydError,
    InvalidArgument,
    InvalidPackage,
    ObjectNotFound,
    PackageNotFound,
    TooLarge,
    WorkerCrashed,
)
from server.ipc import protocol
from server.ipc.call_board import Row
from server.malloc import release_free_memory
from server.models.devices import resolve_device
from server.models.names import ModelNames, NamedModel, check_name, is_object_id
from server.models.packages import PackageStore, StoredPackage
from server.models.placement import EVERYWHERE, Placement, choose_slots
from server.models.registry import ObjectRecord, PackageRecord, Registry, ReplayKey
from server.models.weights import SharedWeights, stage_weights
from server.pool.dispatcher import Dispatcher, Slots
from server.pool.keepers import Keeper
from server.pool.object_labels import object_label
from server.pool.supervisor import Supervisor, WorkerStatus
from server.pool.worker_handle import WorkerHandle, WorkerState

log = logging.getLogger(__name__)

_NOT_A_PACKAGE = "not a loadable torch.package archive"
# Replays of one module, package or object that may kill new workers before it is evicted.
_REPLAY_STRIKES = 2


class StatusSnapshot(NamedTuple):
    workers: list[WorkerStatus]
    packages: list[PackageRecord]
    objects: list[ObjectRecord]
    modules: list[str]
    queued_calls: int
    models: list[NamedModel]
    calls_in_flight: dict[str, int]  # object id -> calls running on it
    batching: dict[str, BatchPolicy]  # object id -> its batching, for those with batching on


class LoadedObject(NamedTuple):
    object_id: str
    name: str  # the model name it serves under; "" for an anonymous object
    version: int  # its version of that name; 0 for an anonymous object


_NO_BATCH_OBSERVER = BatchObserver(lambda model, rows: None, lambda model, seconds: None)


async def _nothing() -> None:
    pass


class ModelService:
    def __init__(
        self,
        supervisor: Supervisor,
        dispatcher: Dispatcher,
        store: PackageStore,
        registry: Registry,
        on_objects_changed: Callable[[], Awaitable[None]] = _nothing,
        replay_step_timeout: float = 60.0,
        max_packages: int = 0,
        max_objects: int = 0,
        batch_observer: BatchObserver = _NO_BATCH_OBSERVER,
        on_warmup: Callable[[float], None] = lambda seconds: None,
        routes_to_workers: bool = False,
        signatures: Callable[[], dict[str, Any]] = dict,
        direct_calls: Callable[[int], Row] | None = None,
        slot_gpus: tuple[int, ...] = (),
        keepers: dict[int, Keeper] | None = None,
    ) -> None:
        """on_objects_changed: awaited after objects were loaded or unloaded, before the caller is answered.
        replay_step_timeout: seconds one replayed module, package or object may take in a new worker.
        max_packages, max_objects: how many may be loaded at once (limits.*); 0: no limit.
        on_warmup: the seconds a model's warmup took in one worker (the daemon's metrics).
        routes_to_workers: the workers serve calls themselves (data ports): each is told what
        names and ids serve (SetRoutes) whenever that changes, before any unload reaches it.
        signatures: name -> (inputs, outputs) declared by the model entries, for those routes.
        direct_calls: a worker slot's calls on its data port (the call board), for Status.
        slot_gpus: each worker slot's GPU, -1 for none (pool.gpus; (): no GPUs).
        keepers: GPU -> its keeper (server.pool.keepers), which holds the weights of the models on
        that GPU once for its workers; None or a GPU without one: each worker moves its own copy."""
        self._slot_gpus = slot_gpus
        self._keepers = keepers or {}
        self._supervisor = supervisor
        self._dispatcher = dispatcher
        self._max_packages = max_packages
        self._max_objects = max_objects
        self._replay_step_timeout = replay_step_timeout
        self._on_objects_changed = on_objects_changed
        self._store = store
        self._registry = registry
        self._replay_strikes: dict[ReplayKey, int] = {}
        self._evicted: dict[str, str] = {}  # object id -> why it was evicted
        self._names = ModelNames()
        self._in_flight: Counter[str] = Counter()  # object id -> calls running on it
        self._drains: set[asyncio.Task[None]] = set()  # unloads of versions whose last call ended
        self._release_when_unused: set[str] = set()  # packages to unload with their last object
        self._batchers: dict[str, Batcher] = {}  # object id -> its batcher (models with batching on)
        self._batch_observer = batch_observer
        self._on_warmup = on_warmup
        self._routes_to_workers = routes_to_workers
        self._signatures = signatures
        self._direct_calls = direct_calls
        # Grows with every change of what the workers serve or of which workers serve: what a
        # client's list of data ports is checked against (deployd.v1 Endpoints).
        self.generation = 0

    async def prepare_worker(self, worker: WorkerHandle) -> None:
        """Replay everything loaded into a new worker, before it takes calls (the supervisor holds `changes`)."""
        for key, request in self._registry.replay_steps(worker.index):
            try:
                await self._replay_step(worker, key, request)
            except WorkerCrashed as crash:
                if crash.caused_by_call:
                    await self._strike(key, str(crash))
                raise
            except DeploydError as error:
                # It failed outright (it may never have run anywhere: a load that no worker
                # could run at the time is taken on one worker's word): no retry will differ.
                await self._evict(key, f"evicted: replaying {_described(key)} into a new worker failed: {error}")
                raise
        self._replay_strikes.clear()
        if self._routes_to_workers:
            await asyncio.wait_for(worker.request(self.routes(worker.index), []), self._replay_step_timeout)

    def _observe_warmup(self, target: str, replies: list[Any]) -> None:
        """Log that a model's warmup ran, and observe each worker's (each replies with its seconds)."""
        timed = [value for value in replies if isinstance(value, float)]
        for seconds in timed:
            self._on_warmup(seconds)
        if timed:
            log.info("%s warmed up on %d workers in %.3fs (the slowest)", target, len(timed), max(timed))

    async def _replay_step(self, worker: WorkerHandle, key: ReplayKey, request: protocol.Request) -> None:
        # A replay that hangs would hold `changes`, and so every load, for ever: past the
        # timeout the worker is killed, and the step counts as one that killed it.
        try:
            seconds, _ = await asyncio.wait_for(worker.request(request, []), self._replay_step_timeout)
            if isinstance(seconds, float):  # a LoadPickle's warmup (server.models.warmup)
                log.info("worker %d: %s warmed up in %.3fs", worker.index, _described(key), seconds)
                self._on_warmup(seconds)
        except TimeoutError:
            why = f"was killed: replaying {_described(key)} took over {self._replay_step_timeout:g}s"
            worker.kill(why, "replay_timeout", caused_by_call=True)
            raise WorkerCrashed(f"worker {worker.index} {why}", caused_by_call=True) from None

    async def _strike(self, key: ReplayKey, last_death: str) -> None:
        strikes = self._replay_strikes[key] = self._replay_strikes.get(key, 0) + 1
        if strikes < _REPLAY_STRIKES:
            return
        del self._replay_strikes[key]
        what = _described(key)
        await self._evict(key, f"evicted: replaying {what} into {strikes} new workers killed each (last: {last_death})")

    async def _evict(self, key: ReplayKey, why: str) -> None:
        """Forget what cannot be replayed, so that new workers can start without it."""
        self._replay_strikes.pop(key, None)
        log.error("%s", why)
        if key.kind == "object" and key.name in self._registry.objects:
            await self._drop_objects([self._registry.objects[key.name]], why)
        elif key.kind == "package" and key.name in self._registry.packages:
            await self._drop_package(key.name, why)
        elif key.kind == "module":
            self._registry.modules.pop(key.name, None)

    # ------------------------------------------------------------------ modules and packages

    async def register_module(self, name: str, source: str) -> None:
        async with self._supervisor.changes:
            await self._everywhere(protocol.RegisterModule(name, source), None, f"module {name!r}")
            self._registry.modules[name] = source

    async def load_package_stream(self, chunks: AsyncIterator[bytes]) -> PackageRecord:
        return await self._open_package(await self._store.save(chunks))

    async def load_package_path(self, path: str) -> PackageRecord:
        return await self._open_package(await self._store.import_server_path(path))

    async def _open_package(self, stored: StoredPackage) -> PackageRecord:
        async with self._supervisor.changes:
            existing = self._registry.packages.get(stored.package_id)
            if existing is not None:
                return existing
            if self._max_packages and len(self._registry.packages) >= self._max_packages:
                self._store.remove(stored.package_id)
                raise TooLarge(f"{self._max_packages} packages are loaded, the limit (limits.max_packages)")
            record = PackageRecord(*stored)
            try:
                record = PackageRecord(*stored, weights=await self._stage_weights(stored))
                await self._everywhere(record.open_request(), protocol.ClosePackage(stored.package_id), _NOT_A_PACKAGE)
            except DeploydError:
                self._store.remove(stored.package_id)
                if record.weights is not None:
                    record.weights.segment.unlink()
                raise
            self._registry.packages[record.package_id] = record
            return record

    async def _stage_weights(self, stored: StoredPackage) -> SharedWeights | None:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, stage_weights, stored.path)
        except (zipfile.BadZipFile, OSError, KeyError, ValueError) as error:
            raise InvalidPackage(f"{_NOT_A_PACKAGE}: {error}") from None

    async def unload_package(self, package_id: str) -> list[str]:
        """Unload a package and every object made from it; returns those objects' ids."""
        async with self._supervisor.changes:
            if package_id not in self._registry.packages:
                raise PackageNotFound(package_id)
            return await self._drop_package(package_id)

    async def _drop_package(self, package_id: str, why: str = "") -> list[str]:
        """Forget a package and its objects everywhere (caller holds `changes`)."""
        record = self._registry.packages.pop(package_id)
        self._release_when_unused.discard(package_id)
        objects = self._registry.objects_of(package_id)
        await self._drop_objects(objects, why)
        await self._dispatcher.broadcast(protocol.ClosePackage(package_id), [])
        self._store.remove(package_id)
        if record.weights is not None:
            # Workers keep their mappings while replicas use them; the pages go with the last.
            record.weights.segment.unlink()
        release_free_memory()  # what streaming and staging the package left in the heap
        return [loaded.object_id for loaded in objects]

    async def _drop_objects(self, objects: list[ObjectRecord], why: str = "") -> None:
        """Forget objects everywhere (caller holds `changes`); why: what later calls to them are told."""
        for loaded in objects:
            del self._registry.objects[loaded.object_id]
            self._names.forget_object(loaded.object_id)
            batcher = self._batchers.pop(loaded.object_id, None)
            if batcher is not None:
                batcher.close()
            if why:
                self._evicted[loaded.object_id] = why
        if objects:
            await self.publish_routes()  # no worker takes a call for them once they start to go
        for loaded in objects:
            await self._dispatcher.broadcast(protocol.UnloadObject(loaded.object_id), [], loaded.slots)
            await self._release_kept(loaded.object_id, loaded.shared)  # after every worker let it go
        for package_id in {loaded.package_id for loaded in objects} & self._release_when_unused:
            if package_id in self._registry.packages and not self._registry.objects_of(package_id):
                self._release_when_unused.discard(package_id)
                await self._drop_package(package_id)
        if objects:
            await self._on_objects_changed()

    async def release_package_when_unused(self, package_id: str) -> None:
        """Unload a package now if no object uses it, else once its last object is unloaded
        (a model version that drains)."""
        async with self._supervisor.changes:
            if package_id not in self._registry.packages:
                return
            if self._registry.objects_of(package_id):
                self._release_when_unused.add(package_id)
            else:
                await self._drop_package(package_id)

    async def load_resource(self, package_id: str, module: str, resource: str, binary: bool) -> Any:
        self._require_package(package_id)
        value, _ = await self._dispatcher.call(protocol.LoadResource(package_id, module, resource, binary), [])
        return value

    # ------------------------------------------------------------------ objects

    async def load_pickle(
        self,
        package_id: str,
        module: str,
        file: str,
        name: str = "",
        batching: BatchPolicy | None = None,
        placement: Placement | None = None,
        warmup: tuple[Any, ...] = (),
        device: str = "cpu",
    ) -> LoadedObject:
        """Unpickle an object on every worker (or where placement says; None: where the
        name's serving version is, else every worker); with a name, serve it as that model's
        next version (with batching, its calls batched: server.batching). warmup: calls each
        worker runs on it before the load succeeds (server.models.warmup's warmup_message), and
        so before it serves. device: where it runs (server.models.devices): a model on a GPU is
        placed on that GPU's workers only."""
        if name:
            check_name(name)
        runs_on, allowed = resolve_device(device, self._slot_gpus)
        if placement is not None:
            placement.checked(self._supervisor.size)
        if batching is not None:
            if not name:
                raise InvalidArgument("batching is for a model with a name: give the object one")
            batching.checked()
        object_id = f"obj-{secrets.token_hex(8)}"
        async with self._supervisor.changes:
            self._require_package(package_id)
            if self._max_objects and len(self._registry.objects) >= self._max_objects:
                raise TooLarge(f"{self._max_objects} objects are loaded, the limit (limits.max_objects)")
            placement, slots = self._place(name, placement, device, allowed)
            what = f"model {name!r}" if name else f"pickle {file!r} of module {module!r}"
            context = f"cannot load {what}" + (f" on {device}" if runs_on != "cpu" else "")
            request = protocol.LoadPickle(object_id, package_id, module, file, warmup, runs_on)
            shared = await self._keep(request, slots, context) if runs_on == "cuda" else {}
            try:
                warmed = await self._load_on_workers(request, slots, shared, context)
            except BaseException:
                await self._release_kept(object_id, shared)
                raise
            if warmup:
                self._observe_warmup(name or object_id, warmed)
            self._registry.objects[object_id] = ObjectRecord(
                object_id,
                package_id,
                module,
                file,
                warmup=warmup,
                slots=slots,
                placement=placement,
                device=device,
                runs_on=runs_on,
                shared=shared,
            )
            if batching is not None:
                pool = self._batch_pool(slots)
                self._batchers[object_id] = Batcher(object_id, name, batching, pool, self._batch_observer)
            self._release_when_unused.discard(package_id)  # in use again
            version, replaced = self._names.add_version(name, object_id) if name else (0, None)
            # Every worker serves the new version before the old one is unloaded anywhere.
            await self.publish_routes()
            if replaced is not None and not self._in_flight[replaced]:
                await self._drop_objects([self._registry.objects[replaced]])
            await self._on_objects_changed()
        return LoadedObject(object_id, name, version)

    def _gpus_of(self, slots: tuple[int, ...] | None) -> list[int]:
        """The GPUs the slots are bound to, in order."""
        chosen = range(self._supervisor.size) if slots is None else slots
        return sorted({self._slot_gpus[slot] for slot in chosen if slot < len(self._slot_gpus)} - {-1})

    async def _keep(
        self, request: protocol.LoadPickle, slots: tuple[int, ...] | None, context: str
    ) -> dict[int, dict[str, Any]]:
        """Have the keeper of each GPU of `slots` hold the object's weights: GPU -> handles. All
        or nothing: on a failure the keepers that took it let it go."""
        shared: dict[int, dict[str, Any]] = {}
        path = self._registry.packages[request.package_id].path
        try:
            for gpu in self._gpus_of(slots):
                keeper = self._keepers.get(gpu)
                if keeper is not None:
                    shared[gpu] = await keeper.keep(request.object_id, path, request.module, request.file)
        except DeploydError as error:
            await self._release_kept(request.object_id, shared)
            error.args = (f"{context}: {error}",)
            raise
        return shared

    async def _release_kept(self, object_id: str, shared: dict[int, dict[str, Any]]) -> None:
        for gpu in shared:
            try:
                await self._keepers[gpu].drop(object_id)
            except DeploydError as error:
                log.warning("the keeper of GPU %d could not let %s go: %s", gpu, object_id, error)

    async def _load_on_workers(
        self,
        request: protocol.LoadPickle,
        slots: tuple[int, ...] | None,
        shared: dict[int, dict[str, Any]],
        context: str,
    ) -> list[Any]:
        """LoadPickle on the slots, each GPU's workers with their keeper's handles; all or nothing."""
        if not shared:
            return await self._everywhere(request, protocol.UnloadObject(request.object_id), context, slots)
        chosen = tuple(range(self._supervisor.size)) if slots is None else slots
        groups: dict[int, tuple[int, ...]] = {}
        for slot in chosen:
            gpu = self._slot_gpus[slot] if slot < len(self._slot_gpus) else -1
            groups[gpu] = (*groups.get(gpu, ()), slot)
        replies: list[Any] = []
        done: list[tuple[int, ...]] = []
        try:
            for gpu, group in groups.items():
                step = request._replace(shared=shared.get(gpu, {}))
                replies += await self._everywhere(step, protocol.UnloadObject(request.object_id), context, group)
                done.append(group)
        except BaseException:
            for group in done:
                await self._dispatcher.broadcast(protocol.UnloadObject(request.object_id), [], group)
            raise
        return replies

    def _place(
        self, name: str, placement: Placement | None, device: str, allowed: tuple[int, ...] | None
    ) -> tuple[Placement, tuple[int, ...] | None]:
        """The placement of a new object and its slots, among those its device allows (None:
        any): a name's new version keeps the slots of the one it replaces when the placement
        and device are the same (or the placement not given); others go to the slots holding
        the fewest placed objects."""
        current = self._serving_record(name)
        if current is not None and current.device == device and (placement is None or placement == current.placement):
            return current.placement, current.slots
        placement = EVERYWHERE if placement is None else placement
        held = [record.slots for record in self._registry.objects.values() if record.slots is not None]
        return placement, choose_slots(placement, self._supervisor.size, held, allowed)

    def _serving_record(self, name: str) -> ObjectRecord | None:
        model = self._names.models.get(name) if name else None
        if model is None or not model.serving:
            return None
        return self._registry.objects.get(model.versions[model.serving])

    def has_workers(self, object_id: str) -> bool:
        """Whether a worker that holds the object serves now."""
        record = self._registry.objects.get(object_id)
        return record is not None and self._dispatcher.serving_in(record.slots) > 0

    def without_workers(self) -> set[str]:
        """The object ids, and names of serving versions, placed on slots none of whose workers
        serves now (their health is NOT_SERVING until one does)."""
        stranded = {
            object_id
            for object_id, record in self._registry.objects.items()
            if record.slots is not None and not self._dispatcher.serving_in(record.slots)
        }
        names = {name for name, model in self._names.models.items() if model.versions.get(model.serving) in stranded}
        return stranded | names

    def slots_of(self, object_id: str) -> tuple[int, ...] | None:
        """The worker slots an object is loaded on; None: every one."""
        record = self._registry.objects.get(object_id)
        return record.slots if record is not None else None

    async def unload_object(self, target: str) -> None:
        """Unload an object, or a model name and every version of it."""
        async with self._supervisor.changes:
            if is_object_id(target):
                self._require_object(target)
                object_ids = [target]
            else:  # a name: every version, draining ones too (NotFound if it has none)
                object_ids = self._names.objects_of(target) or [self._names.resolve(target)]
            await self._drop_objects([self._registry.objects[object_id] for object_id in object_ids])

    async def invoke(
        self, target: str, version: int, method: str, args: list[Any], kwargs: dict[str, Any], buffers: list[Any]
    ) -> tuple[Any, list[Any]]:
        """Call a method of an object or a model (its serving version, or the one pinned) on a
        free worker: packed values in, a packed value out."""
        object_id = self._resolve(target, version)
        tracing.annotate(model=target, version=version, object_id=object_id)
        batcher = self._batchers.get(object_id)
        if batcher is not None:
            return await self._counted(object_id, batcher.call(method, args, kwargs, buffers))
        return await self._counted_call(object_id, protocol.Invoke(object_id, method, args, kwargs), buffers)

    async def has_attr(self, target: str, version: int, name: str) -> bool:
        object_id = self._resolve(target, version)
        tracing.annotate(model=target, version=version, object_id=object_id)
        present, _ = await self._counted_call(object_id, protocol.HasAttr(object_id, name), [])
        return bool(present)

    def named_model(self, name: str) -> NamedModel:
        """A model by name, with its versions; NotFound if no version of it is loaded."""
        return self._names.named(name)

    def served_names(self) -> set[str]:
        """The model names that have a serving version."""
        return self._names.served()

    def _resolve(self, target: str, version: int) -> str:
        return self._names.resolve_target(
            target, version, self._registry.objects, lambda object_id: self._evicted.get(object_id, "")
        )

    async def _counted_call(
        self, object_id: str, request: protocol.Request, buffers: list[Any]
    ) -> tuple[Any, list[Any]]:
        slots = self.slots_of(object_id)
        return await self._counted(object_id, self._dispatcher.call(request, buffers, slots=slots))

    async def _counted(self, object_id: str, call: Awaitable[tuple[Any, list[Any]]]) -> tuple[Any, list[Any]]:
        # Counted from before the first await: a swap that retires this version meanwhile
        # sees the call and leaves the version loaded until it ends.
        self._in_flight[object_id] += 1
        try:
            return await call
        finally:
            self._in_flight[object_id] -= 1
            if not self._in_flight[object_id]:
                del self._in_flight[object_id]
                if self._names.is_draining(object_id):
                    task = asyncio.create_task(self._unload_drained(object_id))
                    self._drains.add(task)
                    task.add_done_callback(self._drains.discard)

    async def _unload_drained(self, object_id: str) -> None:
        """Unload a version that no longer serves, once its last call has ended."""
        async with self._supervisor.changes:
            record = self._registry.objects.get(object_id)
            if record is not None and self._names.is_draining(object_id) and not self._in_flight[object_id]:
                await self._drop_objects([record])

    # ------------------------------------------------------------------ routes (data ports)

    def direct_targets(self, slot: int) -> list[str]:
        """What clients are told to call on the data port of the worker in `slot`: every name and
        object id that serves and that worker holds, but those that batch. A worker joins only
        the calls that reach it between two runs (its one thread runs the model), so batches
        barely form there; the daemon's one line makes them."""
        batched = set(self._batchers)
        objects = self._registry.objects
        held = {object_id for object_id, record in objects.items() if record.held_by(slot) and object_id not in batched}
        names = [name for name, model in self._names.models.items() if model.versions.get(model.serving) in held]
        return sorted(names) + sorted(held)

    def routes(self, slot: int) -> protocol.SetRoutes:
        """What names and ids serve now, as the worker in `slot` with a data port needs to know
        it: every name, but only the objects it holds (a call for a model placed elsewhere is
        refused there, NotFound)."""
        models = {name: (model.serving, dict(model.versions)) for name, model in self._names.models.items()}
        held = [object_id for object_id, record in self._registry.objects.items() if record.held_by(slot)]
        batching = {
            object_id: (
                batcher.policy.max_batch_size,
                batcher.policy.max_queue_delay_ms,
                list(batcher.policy.preferred_batch_sizes),
            )
            for object_id, batcher in self._batchers.items()
            if object_id in held
        }
        return protocol.SetRoutes(self.generation, models, held, self._signatures(), batching)

    async def publish_routes(self) -> None:
        """Tell every serving worker what serves now, under a new generation (callers that
        change what workers hold hold `changes`; a pool change may publish at any time: a
        worker keeps the newest generation it was sent)."""
        self.generation += 1
        if self._routes_to_workers and self._supervisor.serving_count:
            slots = range(self._supervisor.size)
            await asyncio.gather(*(self._dispatcher.broadcast(self.routes(slot), [], (slot,)) for slot in slots))

    @property
    def queued_calls(self) -> int:
        """Calls waiting: for a free worker, or in a batcher for their batch to go."""
        return self._dispatcher.queue_depth + sum(batcher.waiting for batcher in self._batchers.values())

    def _batch_pool(self, slots: Slots) -> BatchPool:
        dispatcher = self._dispatcher
        if slots is None:
            return BatchPool(
                dispatcher.call, dispatcher.idle_count, dispatcher.max_queued_calls, dispatcher.release_listeners
            )
        return BatchPool(
            functools.partial(dispatcher.call, slots=slots),
            functools.partial(dispatcher.idle_count, slots),
            dispatcher.max_queued_calls,
            dispatcher.release_listeners,
        )

    def close(self) -> None:
        """Stop the batchers; unlink every package's shared weights (after the pool has stopped)."""
        for batcher in self._batchers.values():
            batcher.close()
        for record in self._registry.packages.values():
            if record.weights is not None:
                record.weights.segment.unlink()

    # ------------------------------------------------------------------ inspection

    def status(self) -> StatusSnapshot:
        return StatusSnapshot(
            self._worker_status(),
            list(self._registry.packages.values()),
            list(self._registry.objects.values()),
            list(self._registry.modules),
            self.queued_calls,
            list(self._names.models.values()),
            dict(self._in_flight),
            {object_id: batcher.policy for object_id, batcher in self._batchers.items()},
        )

    def _worker_status(self) -> list[WorkerStatus]:
        """The supervisor's view of each worker, with the calls its data port served and runs."""
        workers = self._supervisor.status()
        if self._direct_calls is None:
            return workers
        merged = []
        for worker in workers:
            row = self._direct_calls(worker.index)
            busy = worker.state == WorkerState.IDLE and row.in_flight > 0
            merged.append(
                dataclasses.replace(
                    worker,
                    state=WorkerState.BUSY if busy else worker.state,
                    calls_served=worker.calls_served + row.finished,
                )
            )
        return merged

    # ------------------------------------------------------------------ helpers

    def resolve(self, target: str, version: int) -> str:
        """The object id an object id or model name (and version) stands for now; NotFound if none."""
        return self._resolve(target, version)

    def require_package(self, package_id: str) -> None:
        self._require_package(package_id)

    def _require_package(self, package_id: str) -> None:
        if package_id not in self._registry.packages:
            raise PackageNotFound(package_id)

    def _require_object(self, object_id: str) -> None:
        if object_id not in self._registry.objects:
            raise ObjectNotFound(object_id, self._evicted.get(object_id, ""))

    async def _everywhere(
        self, request: protocol.Request, undo: protocol.Request | None, context: str, slots: Slots = None
    ) -> list[Any]:
        """Run a request on every serving worker (of `slots`), all or nothing (caller holds
        `changes`); returns the replies of those that ran it."""
        if self._dispatcher.serving_in(slots) == 0:
            where = "" if slots is None else f" in worker slots {', '.join(map(str, slots))}"
            raise WorkerCrashed(f"no worker is serving{where}; try again once the pool has recovered")
        outcomes = await self._dispatcher.broadcast(request, [], slots)
        succeeded = [worker for worker, outcome in outcomes if not isinstance(outcome, BaseException)]
        # A worker that died before it started this request (it was busy with a call that
        # hung or crashed) says nothing about the request: its replacement gets it by replay,
        # once `changes` is released. One worker that ran it is still needed to vouch for it.
        bystanders: list[tuple[WorkerHandle, BaseException]] = [
            (worker, outcome)
            for worker, outcome in outcomes
            if isinstance(outcome, WorkerCrashed) and not outcome.started
        ]
        failures = [
            (worker, outcome)
            for worker, outcome in outcomes
            if isinstance(outcome, BaseException) and (worker, outcome) not in bystanders
        ]
        if not failures and succeeded:
            for worker, outcome in bystanders:
                log.warning("%s: worker %d will get it by replay: %s", context, worker.index, outcome)
            return [outcome[0] for worker, outcome in outcomes if not isinstance(outcome, BaseException)]
        if not failures:
            failures = bystanders
        if undo is not None:
            for worker in succeeded:
                try:
                    await worker.request(undo, [])
                except DeploydError as error:
                    log.warning("could not undo %s on worker %d: %s", type(request).__name__, worker.index, error)
        worker, failure = failures[0]
        if isinstance(failure, WorkerCrashed) and failure.caused_by_call:
            failure.args = (f"{context}: it killed the worker: {failure}",)
        elif isinstance(failure, WorkerCrashed):
            failure.args = (f"{context}: the worker died before it could finish: {failure}; try again",)
        elif isinstance(failure, DeploydError):
            failure.args = (f"{context}: {failure} (on worker {worker.index})",)
        raise failure


def _described(key: ReplayKey) -> str:
    """What a replay step brings back, for the log: "object 'obj-1f2e' (model seed v2)"."""
    label = object_label(key.name) if key.kind == "object" else ""
    return f"{key.kind} {key.name!r}" + (f" ({label})" if label else "")
