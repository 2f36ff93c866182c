"""One client core: the blocking client is generated from the asyncio one
(scripts/generate_sync_client.py). The checked-in copy is current, the rewrite refuses to leave
asyncio in blocking code, the two clients keep their names, and a model handle's unary calls
take the one road (`call_object`) the direct path will branch from."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import client
import client.aio
from client import InterpreterManager
from client.aio import AsyncInterpreterManager
from deployd_wire.proto import deployd_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "generate_sync_client.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_sync_client", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checked_in_blocking_client_is_current() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("source", ["import asyncio\n", "x = grpc.aio.EOF\n", "class AsyncThing: ...\n"])
def test_asyncio_left_in_the_blocking_client_fails_the_generation(source: str) -> None:
    with pytest.raises(SystemExit, match="left in the blocking client"):
        load_script()._check_no_leaks("_manager.py", source)


def test_both_clients_keep_their_names() -> None:
    assert set(client.aio.__all__) - set(client.__all__) == {
        "AsyncInterpreterManager",
        "AsyncInterpreterSession",
        "AsyncObj",
        "AsyncPackage",
        "AsyncReplicatedObj",
        "AsyncWorkerInstance",
    }
    for name in client.__all__:
        assert getattr(client, name).__name__ == name
    for name in client.aio.__all__:
        assert getattr(client.aio, name).__name__ == name
    # The one difference in shape: num_workers cannot be a property where it has to be awaited.
    assert isinstance(inspect.getattr_static(InterpreterManager, "num_workers"), property)
    assert inspect.iscoroutinefunction(AsyncInterpreterManager.num_workers)


def answer(rpc_name: str) -> Any:
    return pb.InvokeResponse(result=pb.Value(int_value=7)) if rpc_name == "Invoke" else pb.HasAttrResponse(present=True)


def test_a_handles_unary_calls_go_through_call_object() -> None:
    seen: list[tuple[str, Any]] = []

    def call_object(rpc_name: str, request: Any, timeout: float | None = None, retry: Any = None) -> Any:
        seen.append((rpc_name, request))
        return answer(rpc_name)

    with InterpreterManager("127.0.0.1:1") as manager:  # never connected: no call reaches the channel
        manager.call_object = call_object  # type: ignore[method-assign]
        model = manager.model("m", version=2).options(timeout=5)
        assert model(1) == 7
        assert model.call_method("forward") == 7
        assert model.hasattr("forward") is True
    assert [(name, request.object_id, request.version) for name, request in seen] == [
        ("Invoke", "m", 2),
        ("Invoke", "m", 2),
        ("HasAttr", "m", 2),
    ]


def test_an_async_handles_unary_calls_go_through_call_object() -> None:
    seen: list[str] = []

    async def call_object(rpc_name: str, request: Any, timeout: float | None = None, retry: Any = None) -> Any:
        seen.append(rpc_name)
        return answer(rpc_name)

    async def main() -> None:
        async with AsyncInterpreterManager("127.0.0.1:1") as manager:
            manager.call_object = call_object  # type: ignore[method-assign]
            model = manager.model("m")
            assert await model(1) == 7
            assert await model.hasattr("forward") is True

    asyncio.run(main())
    assert seen == ["Invoke", "HasAttr"]
