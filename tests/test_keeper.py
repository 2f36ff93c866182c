"""The keeper (server.pool.keepers, server.worker.keeper, server.worker.handles) on the CPU: its
process lifecycle, the handles it gives, a worker's runtime adopting them. On a GPU the handles
are CUDA IPC ones (tests/test_gpu_device.py); here the same code shares through shared memory.
"""

from __future__ import annotations

import asyncio
import marshal
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from server.errors import InvalidArgument
from server.ipc import protocol
from server.pool.keepers import Keeper, KeeperFailed
from server.worker.handles import adopt_state, rebuild, share_state
from server.worker.runtime import Runtime
from tests.daemon_process import REPO, wait_until


def torch_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("torch_")}


def in_another_process(handle: Any, code: str) -> str:
    """Run code with `tensor` rebuilt from handle in a fresh interpreter (a worker's stand-in); its output."""
    program = (
        "import marshal\nfrom server.worker.handles import rebuild\n"
        f"tensor = rebuild(marshal.loads(bytes.fromhex({marshal.dumps(handle).hex()!r})))\n{code}"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_keeper_holds_a_models_weights_for_other_processes(package_dir: Path) -> None:
    before = torch_segments()
    package = str(package_dir / "models.pt")

    async def scenario() -> None:
        keeper = Keeper(-1, "cpu")
        await keeper.start(multiprocessing.get_context("forkserver"))
        try:
            handles = await keeper.keep("obj-1", package, "models", "scale.pkl")
            assert set(handles) == {"factor"}
            again = await keeper.keep("obj-1", package, "models", "scale.pkl")
            assert again["factor"][-2] == handles["factor"][-2]  # kept once: the same segment
            # A worker maps the weights and writes to them; it exits (as a killed one would);
            # the next one maps the same memory: one copy, which outlives the workers.
            assert (
                in_another_process(handles["factor"], "print(float(tensor.detach())); tensor.data.fill_(3.0)") == "2.0"
            )
            assert in_another_process(handles["factor"], "print(float(tensor.detach()), type(tensor).__name__)") == (
                "3.0 Parameter"
            )
            assert await keeper.kept() == ["obj-1"]
            with pytest.raises(InvalidArgument, match=r"the keeper of cpu: .*no_such"):
                await keeper.keep("obj-2", package, "models", "no_such.pkl")
            await keeper.drop("obj-1")
            assert await keeper.kept() == []
        finally:
            await keeper.stop(5.0)
        assert not keeper.alive and not keeper.died.is_set()  # stopped, not died
        with pytest.raises(KeeperFailed, match="not running"):
            await keeper.kept()

    asyncio.run(scenario())
    # Its segments go with their last user (torch's shm manager unlinks them).
    assert wait_until(lambda: torch_segments() <= before, 10), torch_segments() - before


def test_a_keeper_that_dies_fails_what_is_asked_of_it(package_dir: Path) -> None:
    async def scenario() -> None:
        keeper = Keeper(-1, "cpu")
        await keeper.start(multiprocessing.get_context("forkserver"))
        try:
            assert not keeper.died.is_set()
            os.kill(keeper.pid, 9)
            await asyncio.wait_for(keeper.died.wait(), 30)  # seen at once, before anything is asked
            with pytest.raises(KeeperFailed, match=r"the keeper of cpu \(pid \d+\) died"):
                await keeper.keep("obj-1", str(package_dir / "models.pt"), "models", "scale.pkl")
        finally:
            await keeper.stop(5.0)

    asyncio.run(scenario())


def test_a_workers_runtime_adopts_the_shared_weights_without_a_copy(package_dir: Path) -> None:
    torch.multiprocessing.set_sharing_strategy("file_system")
    source = torch.nn.Linear(3, 2)
    handles = share_state(source)  # this process plays the keeper
    runtime = Runtime()
    opened, _ = runtime.handle(protocol.OpenPackage("pkg", str(package_dir / "models.pt"), "", 0, {}), [])
    assert isinstance(opened, protocol.Result)
    # The Scale model's one weight, "factor", from a keeper's handle of a tensor of ours.
    factor = torch.nn.Parameter(torch.tensor(5.0))
    load = protocol.LoadPickle("obj-1", "pkg", "models", "scale.pkl", (), "cpu", share_state(_Holder(factor)))
    loaded, _ = runtime.handle(load, [])
    assert isinstance(loaded, protocol.Result), loaded
    described, _ = runtime.handle(protocol.Invoke("obj-1", "describe", ["x"], {}), [])
    assert described == protocol.Result("x5.0!")
    factor.data.fill_(7.0)  # the keeper's memory is the worker's: no copy was made
    described, _ = runtime.handle(protocol.Invoke("obj-1", "describe", ["x"], {}), [])
    assert described == protocol.Result("x7.0!")
    # A state that does not fit the model is refused, saying which names.
    wrong = protocol.LoadPickle("obj-2", "pkg", "models", "scale.pkl", (), "cpu", handles)
    refused, _ = runtime.handle(wrong, [])
    assert isinstance(refused, protocol.Failure) and "factor" in refused.message
    copy = torch.nn.Linear(3, 2)
    adopt_state(copy, handles)
    assert torch.equal(copy.weight, source.weight) and copy.weight.is_shared()
    assert rebuild(handles["bias"]).is_shared()


class _Holder(torch.nn.Module):
    def __init__(self, factor: torch.nn.Parameter) -> None:
        super().__init__()
        self.factor = factor
