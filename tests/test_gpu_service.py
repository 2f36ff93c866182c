"""The service's side of the keepers (server.models.service), with stand-ins for the pool and the
keepers: a model on cuda is kept once per GPU, each GPU's workers get that GPU's handles (at load
and in a replay), a failure anywhere undoes it all, an unload lets the keepers go. The real keeper
is tests/test_keeper.py's; the whole path on a GPU, tests/test_gpu_device.py's."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.errors import InvalidArgument, ModelError
from server.ipc import protocol
from server.models.registry import PackageRecord, Registry
from server.models.service import ModelService

SLOT_GPUS = (0, 0, 1, -1)


class FakeKeeper:
    def __init__(self, gpu: int, fail: bool = False) -> None:
        self.gpu = gpu
        self.fail = fail
        self.kept: list[str] = []
        self.dropped: list[str] = []

    async def keep(self, object_id: str, path: str, module: str, file: str) -> dict[str, Any]:
        if self.fail:
            raise InvalidArgument("the model asks for cuda, but this host has no CUDA")
        self.kept.append(object_id)
        return {"weight": ("handle", self.gpu)}

    async def drop(self, object_id: str) -> None:
        self.dropped.append(object_id)


class FakeWorker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.undone: list[str] = []

    async def request(self, message: Any, buffers: list[Any]) -> tuple[Any, list[Any]]:
        self.undone.append(type(message).__name__)
        return None, []


class FakeDispatcher:
    """Runs each broadcast on the slots asked for; slots in `failing` fail a LoadPickle."""

    def __init__(self) -> None:
        self.workers = [FakeWorker(index) for index in range(len(SLOT_GPUS))]
        self.sent: list[tuple[str, tuple[int, ...], Any]] = []
        self.failing: set[int] = set()

    def serving_in(self, slots: tuple[int, ...] | None) -> int:
        return len(self.workers if slots is None else slots)

    async def broadcast(self, request: Any, buffers: list[Any], slots: tuple[int, ...] | None = None) -> list[Any]:
        chosen = tuple(range(len(self.workers))) if slots is None else slots
        self.sent.append((type(request).__name__, chosen, getattr(request, "shared", None)))
        outcomes: list[Any] = []
        for slot in chosen:
            failed = isinstance(request, protocol.LoadPickle) and slot in self.failing
            outcomes.append((self.workers[slot], ModelError("it broke") if failed else (None, [])))
        return outcomes


class FakeSupervisor:
    size = len(SLOT_GPUS)
    serving_count = len(SLOT_GPUS)

    def __init__(self) -> None:
        self.changes = asyncio.Lock()


def service(keepers: dict[int, FakeKeeper]) -> tuple[ModelService, FakeDispatcher, Registry]:
    dispatcher = FakeDispatcher()
    registry = Registry(SLOT_GPUS)
    registry.packages["pkg"] = PackageRecord("pkg", "/store/pkg.pt", 10)
    models = ModelService(
        FakeSupervisor(),  # type: ignore[arg-type]
        dispatcher,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        registry,
        slot_gpus=SLOT_GPUS,
        keepers=keepers,  # type: ignore[arg-type]
    )
    return models, dispatcher, registry


def test_a_model_on_cuda_is_kept_once_per_gpu_and_each_gpus_workers_get_its_handles() -> None:
    async def scenario() -> None:
        keepers = {0: FakeKeeper(0), 1: FakeKeeper(1)}
        models, dispatcher, registry = service(keepers)
        loaded = await models.load_pickle("pkg", "m", "f.pkl", name="net", device="cuda")
        assert keepers[0].kept == keepers[1].kept == [loaded.object_id]
        assert dispatcher.sent == [
            ("LoadPickle", (0, 1), {"weight": ("handle", 0)}),
            ("LoadPickle", (2,), {"weight": ("handle", 1)}),
        ]
        record = registry.objects[loaded.object_id]
        assert (record.slots, record.device, record.runs_on) == ((0, 1, 2), "cuda", "cuda")
        # A replacement worker replays it with its own GPU's handles; the CPU worker does not hold it.
        replays = {
            slot: [step for key, step in registry.replay_steps(slot) if key.kind == "object"] for slot in range(4)
        }
        assert replays[1][0].shared == {"weight": ("handle", 0)} and replays[1][0].device == "cuda"
        assert replays[2][0].shared == {"weight": ("handle", 1)}
        assert replays[3] == []
        await models.unload_object("net")
        assert dispatcher.sent[-1][:2] == ("UnloadObject", (0, 1, 2))
        assert keepers[0].dropped == keepers[1].dropped == [loaded.object_id]

    asyncio.run(scenario())


def test_cuda_1_goes_to_gpu_1s_keeper_and_workers_alone() -> None:
    async def scenario() -> None:
        keepers = {0: FakeKeeper(0), 1: FakeKeeper(1)}
        models, dispatcher, _ = service(keepers)
        await models.load_pickle("pkg", "m", "f.pkl", device="cuda:1")
        assert keepers[0].kept == [] and len(keepers[1].kept) == 1
        assert dispatcher.sent == [("LoadPickle", (2,), {"weight": ("handle", 1)})]

    asyncio.run(scenario())


def test_a_keeper_that_cannot_keep_it_fails_the_load_and_the_others_let_go() -> None:
    async def scenario() -> None:
        keepers = {0: FakeKeeper(0), 1: FakeKeeper(1, fail=True)}
        models, dispatcher, registry = service(keepers)
        with pytest.raises(InvalidArgument, match=r"cannot load model 'net' on auto: .*this host has no CUDA"):
            await models.load_pickle("pkg", "m", "f.pkl", name="net", device="auto")
        assert keepers[0].dropped == keepers[0].kept and keepers[0].kept
        assert dispatcher.sent == [] and not registry.objects

    asyncio.run(scenario())


def test_a_gpus_workers_that_fail_undo_the_load_on_every_gpu() -> None:
    async def scenario() -> None:
        keepers = {0: FakeKeeper(0), 1: FakeKeeper(1)}
        models, dispatcher, registry = service(keepers)
        dispatcher.failing = {2}
        with pytest.raises(ModelError, match="it broke"):
            await models.load_pickle("pkg", "m", "f.pkl", name="net", device="cuda")
        assert dispatcher.sent[-1][:2] == ("UnloadObject", (0, 1))  # GPU 0's workers had loaded it
        assert keepers[0].dropped == keepers[0].kept and keepers[1].dropped == keepers[1].kept
        assert not registry.objects

    asyncio.run(scenario())


def test_a_model_on_the_cpu_involves_no_keeper() -> None:
    async def scenario() -> None:
        keepers = {0: FakeKeeper(0), 1: FakeKeeper(1)}
        models, dispatcher, _ = service(keepers)
        await models.load_pickle("pkg", "m", "f.pkl", device="cpu")
        assert keepers[0].kept == keepers[1].kept == []
        assert dispatcher.sent == [("LoadPickle", (0, 1, 2, 3), {})]

    asyncio.run(scenario())
