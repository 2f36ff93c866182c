"""client.aio against the real daemon: the blocking client's API and errors, as coroutines."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import pytest
import torch

from client import InterpreterManager
from client.aio import (
    AsyncInterpreterManager,
    AsyncPackage,
    Batching,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RemoteError,
    Retry,
    UnavailableError,
)
from tests.daemon_process import DaemonProcess

T = TypeVar("T")


def run(test: Callable[[AsyncInterpreterManager], Awaitable[T]], target: str, **options: Any) -> T:
    """One test body on a fresh event loop, with a manager made inside it (grpc.aio's rule)."""

    async def main() -> T:
        async with AsyncInterpreterManager(target, **options) as manager:
            return await asyncio.wait_for(test(manager), 120)

    return asyncio.run(main())


async def load_models(manager: AsyncInterpreterManager, package_dir: Path) -> AsyncPackage:
    return await manager.load_package(package_dir / "models.pt")


def test_the_readme_flow_gives_the_blocking_clients_numbers(daemon: DaemonProcess, package_dir: Path) -> None:
    x = torch.randn(1, 1, 10, 10)
    with InterpreterManager(daemon.target) as blocking:
        package = blocking.load_package(package_dir / "conv.pt")
        expected = package.load_pickle("model", "model.pkl")(x)
        package.unload()

    async def body(manager: AsyncInterpreterManager) -> torch.Tensor:
        package = await manager.load_package(package_dir / "conv.pt")
        model = await package.load_pickle("model", "model.pkl")
        try:
            return await model(x)  # type: ignore[no-any-return]
        finally:
            await package.unload()

    assert torch.equal(run(body, daemon.target), expected)


def test_every_call_of_the_api(daemon: DaemonProcess, package_dir: Path) -> None:
    async def body(manager: AsyncInterpreterManager) -> None:
        from_bytes = await manager.load_package((package_dir / "models.pt").read_bytes())
        from_server = await manager.load_package(server_path="models.pt")
        assert from_bytes.id == from_server.id  # one package, however it came
        scale = await from_bytes.load_pickle("models", "scale.pkl")
        x = torch.arange(4, dtype=torch.float32)
        assert torch.equal(await scale(x, 0.5, negate=True), -(x * 2 + 0.5))
        assert await scale.call_method("describe", "f", suffix="?") == "f2.0?"
        assert await scale.hasattr("factor") and not await scale.hasattr("nope")
        assert await from_bytes.load_text("models", "notes.txt") == "weights: scale 2.0 ✓"
        assert await from_bytes.load_binary("models", "blob.bin") == bytes(range(256))
        await manager.register_module_source("aio_registered", "def twice(v):\n    return v * 2\n")
        assert await scale.call_method("call_module", "aio_registered", "twice", 21) == 42
        assert await manager.num_workers() == 2
        assert (await manager.status()).workers

        named = await from_bytes.load_pickle("models", "scale.pkl", name="aio-scale", batching=Batching(4))
        assert named.id == "aio-scale" and named.version >= 1
        by_name = manager.model("aio-scale")
        assert torch.equal(await by_name(torch.ones(3)), torch.full((3,), 2.0))
        pinned = manager.model("aio-scale", version=named.version)
        assert torch.equal(await pinned(torch.ones(2)), torch.full((2,), 2.0))

        await scale.unload()
        with pytest.raises(NotFoundError):
            await scale(x)
        unloaded = await from_bytes.unload()
        assert named.object_id in unloaded
        with pytest.raises(NotFoundError):
            await manager.model("aio-scale")(x)

    run(body, daemon.target)


def test_concurrent_calls_each_get_their_own_answer(daemon: DaemonProcess, package_dir: Path) -> None:
    async def body(manager: AsyncInterpreterManager) -> None:
        package = await load_models(manager, package_dir)
        echo = await package.load_pickle("models", "echo.pkl")
        try:
            values = [torch.full((3,), float(i)) for i in range(64)]
            answers = await asyncio.gather(*(echo(value) for value in values))
            assert all(torch.equal(a, v) for a, v in zip(answers, values, strict=True))
            pids = await asyncio.gather(*(echo.call_method("pair", i, key=i) for i in range(16)))
            assert pids == [((i,), {"key": i}) for i in range(16)]
        finally:
            await package.unload()

    run(body, daemon.target)


def test_the_same_errors_as_the_blocking_client(daemon: DaemonProcess, package_dir: Path) -> None:
    async def body(manager: AsyncInterpreterManager) -> None:
        package = await load_models(manager, package_dir)
        scale = await package.load_pickle("models", "scale.pkl")
        try:
            with pytest.raises(RemoteError) as raised:
                await scale.call_method("fail", "boom")
            assert raised.value.remote_type == "ValueError" and "boom" in raised.value.remote_traceback
            with pytest.raises(NotFoundError, match="no method 'no_such_method'"):
                await scale.call_method("no_such_method")
            with pytest.raises(InvalidArgumentError, match="cannot be sent"):
                await scale(object())
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                await scale.options(timeout=0.3).call_method("nap", 5.0)
            assert time.monotonic() - started < 4
            with pytest.raises(FileNotFoundError):
                await manager.load_package(package_dir / "no_such.pt")
            with pytest.raises(TypeError, match="not both"):
                await manager.load_package(b"x", server_path="models.pt")
        finally:
            await package.unload()

    run(body, daemon.target)


def test_retries_hide_a_worker_killed_from_outside(fresh_daemon: DaemonProcess, package_dir: Path) -> None:
    async def body(manager: AsyncInterpreterManager) -> None:
        package = await load_models(manager, package_dir)
        scale = await package.load_pickle("models", "scale.pkl")
        before = {worker.pid for worker in (await manager.status()).workers}
        naps = [asyncio.ensure_future(scale.call_method("nap", 1.0)) for _ in range(2)]
        deadline = time.monotonic() + 10
        while sum(w.state == "busy" for w in (await manager.status()).workers) < 2:
            assert time.monotonic() < deadline, "both workers should be napping"
            await asyncio.sleep(0.05)
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        ran_on = set(await asyncio.gather(*naps))
        assert ran_on and not ran_on & before, "the retries ran on the replacement workers"
        # Without a retry policy the same kill is the caller's UnavailableError.
        plain = scale.options(retry=Retry(attempts=1))
        nap = asyncio.ensure_future(plain.call_method("nap", 2.0))
        deadline = time.monotonic() + 10
        while not any(w.state == "busy" for w in (await manager.status()).workers):
            assert time.monotonic() < deadline, "a worker should be napping"
            await asyncio.sleep(0.05)
        busy = [w.pid for w in (await manager.status()).workers if w.state == "busy"]
        os.kill(busy[0], signal.SIGKILL)
        with pytest.raises(UnavailableError):
            await nap

    retry = Retry(attempts=6, backoff_seconds=0.2, max_backoff_seconds=2.0)
    run(body, fresh_daemon.target, timeout=60, retry=retry)


def test_sessions_and_objs(daemon: DaemonProcess, package_dir: Path) -> None:
    async def body(manager: AsyncInterpreterManager) -> None:
        async with await manager.acquire_one() as session:
            layer = await (await session.global_("torch.nn", "Linear"))(4, 2)
            await layer.weight.data.fill_(0.5)  # attributes as in Python: a step each, the call one more
            await (await (await layer.attr("bias")).attr("data")).call_method("fill_", 0.0)
            out = await layer(torch.ones(1, 4))
            assert torch.equal(await out.to_value(), torch.full((1, 2), 2.0))
            assert await layer.hasattr("weight") and not await layer.hasattr("nope")
            with pytest.raises(InvalidArgumentError, match="has no value form"):
                await layer.to_value()
            replicated = await manager.create_movable(layer, session)
        assert torch.equal(await replicated(torch.ones(1, 4)), torch.full((1, 2), 2.0))
        for instance in await manager.all_instances():
            async with await instance.acquire_session() as there:
                replica = await there.from_movable(replicated)
                assert torch.equal(await (await replica.bias).to_value(), torch.zeros(2))
        await replicated.unload()
        package = await load_models(manager, package_dir)
        scale = await package.load_pickle("models", "scale.pkl")
        async with await scale.acquire_session() as session:
            assert await (await session.self.pid()).to_value() == session.worker_pid  # type: ignore[union-attr]
        async with await package.acquire_session() as session:
            made = await session.self.load_pickle("models", "scale.pkl")  # type: ignore[union-attr]
            assert await (await made.describe("x")).to_value() == "x2.0!"
        await package.unload()
        with pytest.raises(FailedPreconditionError, match="has ended: closed by its client"):
            await out.to_value()

    run(body, daemon.target, timeout=60)
