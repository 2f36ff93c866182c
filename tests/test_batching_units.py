"""Dynamic batching below the daemon: joining and splitting packed values, and the batcher's
dispatch rules against a stand-in pool (the real daemon is in test_batching.py)."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from server.batching.batcher import Batcher, BatchObserver, BatchPolicy, Pool
from server.batching.merge import Unbatchable, batch_key, merge, rows_of, split
from server.errors import InvalidArgument, WorkerCrashed
from server.ipc.protocol import Gathered, Invoke


def tensor(rows: int, width: int, first: float, buffers: list[Any]) -> Any:
    """A float32 tensor of rows x width whose values count up from first, packed."""
    buffers.append(struct.pack(f"<{rows * width}f", *(first + i for i in range(rows * width))))
    return ("tensor", "float32", [rows, width], len(buffers) - 1)


def floats(data: Any) -> list[float]:
    view = memoryview(data).cast("B")
    return list(struct.unpack(f"<{view.nbytes // 4}f", view))


# ---------------------------------------------------------------------------- merge and split


def test_rows_and_keys() -> None:
    buffers: list[Any] = []
    one = tensor(2, 3, 0, buffers)
    assert rows_of([one], {"scale": 2.0}) == 2
    assert batch_key("__call__", [one], {"scale": 2.0}) == batch_key(
        "__call__", [tensor(5, 3, 9, buffers)], {"scale": 2.0}
    )
    assert batch_key("__call__", [one], {}) != batch_key("__call__", [tensor(2, 4, 0, buffers)], {})  # width
    assert batch_key("__call__", [one], {"scale": 2}) != batch_key("__call__", [one], {"scale": 2.0})  # int vs float
    assert batch_key("__call__", [one], {}) != batch_key("forward", [one], {})
    for args in ([], [1, "x"], [("tensor", "float32", [], 0)], [one, tensor(3, 3, 0, buffers)]):
        with pytest.raises(Unbatchable):
            rows_of(args, {})


def test_merge_lays_callers_rows_end_to_end_and_split_gives_each_its_own() -> None:
    calls = []
    for first, rows in ((0, 1), (100, 3), (200, 2)):
        buffers: list[Any] = []
        calls.append(([tensor(rows, 2, first, buffers)], {"flag": True}, buffers))
    merged = merge(calls, [1, 3, 2])
    (arg,) = merged.args
    assert arg[:3] == ("tensor", "float32", [6, 2]) and merged.kwargs == {"flag": True}
    gathered = merged.buffers[arg[3]]
    assert isinstance(gathered, Gathered) and len(gathered.parts) == 3
    assert gathered.parts[1] is calls[1][2][0]  # the caller's own bytes, not a copy
    joined = b"".join(bytes(part) for part in gathered.parts)
    result = ("tuple", [("tensor", "float32", [6, 2], 0), {"n": ("tensor", "float32", [6, 2], 0)}])
    pieces = split(result, [joined], [1, 3, 2])
    assert [piece[0][1][0][2] for piece in pieces] == [[1, 2], [3, 2], [2, 2]]
    assert floats(pieces[1][1][0]) == [100, 101, 102, 103, 104, 105]
    assert floats(pieces[2][1][1]) == [200, 201, 202, 203]
    assert isinstance(pieces[0][1][0], memoryview)  # a view of the reply, not a copy


@pytest.mark.parametrize(
    "result",
    [("tensor", "float32", [5, 2], 0), ("tensor", "float32", [], 0), ("tuple", [1.5]), {"label": "x"}],
    ids=["rows", "0-d", "scalar", "string"],
)
def test_a_result_that_does_not_split(result: Any) -> None:
    with pytest.raises(InvalidArgument, match="does not split into its callers' rows"):
        split(result, [bytes(40)], [1, 3])


# ---------------------------------------------------------------------------- the batcher


class FakePool:
    """A pool of `workers` workers, each call taking `seconds`; records the batches it ran."""

    def __init__(self, workers: int = 1, seconds: float = 0.05, fail: Exception | None = None) -> None:
        self.idle = workers
        self.seconds = seconds
        self.fail = fail
        self.batches: list[int] = []
        self.cancelled = 0
        self.listeners: set[Any] = set()
        self._free = asyncio.Semaphore(workers)

    def as_pool(self) -> Pool:
        return Pool(self.call, lambda: self.idle, 1000, self.listeners)

    async def call(self, message: Invoke, buffers: list[Any], on_start: Any = None) -> tuple[Any, list[Any]]:
        async with self._free:
            self.idle -= 1
            if on_start is not None:
                on_start()
            (arg,) = message.args
            self.batches.append(arg[2][0])
            try:
                await asyncio.sleep(self.seconds)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.idle += 1
                for listener in list(self.listeners):
                    listener()
            if self.fail is not None:
                raise self.fail
            data = (
                b"".join(bytes(part) for part in buffers[0].parts) if isinstance(buffers[0], Gathered) else buffers[0]
            )
            return ("tensor", "float32", arg[2], 0), [data]


def batcher_for(pool: FakePool, size: int = 8, delay_ms: float = 20.0) -> Batcher:
    observer = BatchObserver(lambda model, rows: None, lambda model, seconds: None)
    return Batcher("obj-1", "m", BatchPolicy(size, delay_ms), pool.as_pool(), observer)


async def one_call(batcher: Batcher, value: float) -> float:
    buffers: list[Any] = []
    result, out = await batcher.call("__call__", [tensor(1, 1, value, buffers)], {}, buffers)
    return floats(out[result[3]])[0]


def test_a_lone_call_is_not_delayed() -> None:
    async def main() -> float:
        pool = FakePool(seconds=0.0)
        batcher = batcher_for(pool, delay_ms=2000)
        started = asyncio.get_running_loop().time()
        assert await one_call(batcher, 7) == 7
        return asyncio.get_running_loop().time() - started

    assert asyncio.run(main()) < 0.5  # far below the 2 s delay


def test_calls_gather_while_the_worker_is_busy_and_each_gets_its_own_rows() -> None:
    async def main() -> tuple[list[float], list[int]]:
        pool = FakePool(workers=1, seconds=0.05)
        batcher = batcher_for(pool, size=8)
        first = asyncio.ensure_future(one_call(batcher, 0))
        await asyncio.sleep(0.01)  # it runs alone (the worker was free); the rest arrive behind it
        rest = await asyncio.gather(*(one_call(batcher, value) for value in range(1, 10)))
        return [await first, *rest], pool.batches

    results, batches = asyncio.run(main())
    assert results == [float(value) for value in range(10)]
    assert batches == [1, 8, 1]  # alone, then a full batch gathered meanwhile, then the rest


def test_a_caller_that_gives_up_leaves_without_failing_the_others() -> None:
    async def main() -> tuple[list[Any], int]:
        pool = FakePool(workers=1, seconds=0.05)
        batcher = batcher_for(pool)
        calls = [asyncio.ensure_future(one_call(batcher, 0))]
        await asyncio.sleep(0.01)  # the first runs; the others wait for the worker
        calls += [asyncio.ensure_future(one_call(batcher, value)) for value in range(1, 4)]
        await asyncio.sleep(0.01)
        calls[2].cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
        return results, sum(pool.batches)

    results, rows = asyncio.run(main())
    assert results[0] == 0 and results[1] == 1 and results[3] == 3
    assert isinstance(results[2], asyncio.CancelledError)
    assert rows == 3  # the call that gave up while waiting never ran


def test_a_batch_whose_callers_all_gave_up_is_cancelled() -> None:
    async def main() -> int:
        pool = FakePool(workers=1, seconds=0.2)
        batcher = batcher_for(pool)
        call = asyncio.ensure_future(one_call(batcher, 1))
        await asyncio.sleep(0.05)
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        await asyncio.sleep(0.05)
        return pool.cancelled

    assert asyncio.run(main()) == 1


def test_a_worker_crash_fails_every_call_of_its_batch() -> None:
    async def main() -> list[Any]:
        pool = FakePool(workers=1, seconds=0.02, fail=WorkerCrashed("worker 0 died"))
        batcher = batcher_for(pool)
        return await asyncio.gather(*(one_call(batcher, value) for value in range(5)), return_exceptions=True)

    assert all(isinstance(result, WorkerCrashed) for result in asyncio.run(main()))


def test_policies_are_checked() -> None:
    for policy, words in (
        (BatchPolicy(0), "max_batch_size"),
        (BatchPolicy(4, -1), "max_queue_delay_ms"),
        (BatchPolicy(4, 1, (8,)), "preferred_batch_sizes"),
    ):
        with pytest.raises(InvalidArgument, match=words):
            policy.checked()
