"""Calls on a replicated object: kwargs, methods, attributes, unloading, resources, modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from client import InterpreterManager, NotFoundError, Obj, Package, ReplicatedObj


def on_every_worker(manager: InterpreterManager, obj: ReplicatedObj, call: Callable[[Obj], Obj]) -> dict[int, Any]:
    """call(obj's replica) run on each worker in turn, through a session that holds that worker:
    {worker pid: the value it answered}. Fails unless every worker of the pool answered."""
    pids = {worker.index: worker.pid for worker in manager.status().workers}
    answers: dict[int, Any] = {}
    for instance in manager.all_instances():
        with instance.acquire_session() as session:
            assert (session.worker, session.worker_pid) == (instance.index, pids[instance.index])
            answers[session.worker_pid] = call(session.from_movable(obj)).to_value()
    assert len(pids) > 1 and set(answers) == set(pids.values()), f"answered by {set(answers)}, workers {pids}"
    return answers


@pytest.fixture
def models(manager: InterpreterManager, package_dir: Path) -> Package:
    return manager.load_package(package_dir / "models.pt")


def test_call_with_kwargs(models: Package) -> None:
    scale = models.load_pickle("models", "scale.pkl")
    x = torch.arange(4, dtype=torch.float32)
    assert torch.equal(scale(x), x * 2)
    assert torch.equal(scale(x, offset=1.0), x * 2 + 1)
    assert torch.equal(scale(x, 0.5, negate=True), -(x * 2 + 0.5))


def test_call_method_with_args_and_kwargs(models: Package) -> None:
    scale = models.load_pickle("models", "scale.pkl")
    assert scale.call_method("describe", "factor=") == "factor=2.0!"
    assert scale.call_method("describe", "f", suffix="?") == "f2.0?"


def test_hasattr(models: Package) -> None:
    scale = models.load_pickle("models", "scale.pkl")
    assert scale.hasattr("describe")
    assert scale.hasattr("factor")
    assert not scale.hasattr("no_such_attribute")


def test_unknown_method_is_not_found(models: Package) -> None:
    scale = models.load_pickle("models", "scale.pkl")
    with pytest.raises(NotFoundError, match="no method 'no_such_method'"):
        scale.call_method("no_such_method")


def test_unloaded_object_is_not_found(models: Package) -> None:
    scale = models.load_pickle("models", "scale.pkl")
    scale.unload()
    with pytest.raises(NotFoundError) as raised:
        scale(torch.ones(1))
    assert raised.value.code.name == "NOT_FOUND"
    with pytest.raises(NotFoundError):
        scale.hasattr("factor")
    with pytest.raises(NotFoundError):
        scale.unload()


def test_unloaded_package_takes_its_objects(manager: InterpreterManager, package_dir: Path) -> None:
    package = manager.load_package(package_dir / "twin_a.pt")
    twin = package.load_pickle("twins", "twin.pkl")
    assert twin() == "a"
    assert package.unload() == [twin.id]
    with pytest.raises(NotFoundError):
        twin()
    with pytest.raises(NotFoundError):
        package.load_pickle("twins", "twin.pkl")
    with pytest.raises(NotFoundError):
        package.unload()
    # The same bytes load again, under the same id.
    again = manager.load_package(package_dir / "twin_a.pt")
    assert again.id == package.id
    assert again.load_pickle("twins", "twin.pkl")() == "a"


def test_text_and_binary_resources(models: Package) -> None:
    assert models.load_text("models", "notes.txt") == "weights: scale 2.0 ✓"
    assert models.load_binary("models", "blob.bin") == bytes(range(256))


def test_same_bytes_give_the_same_package_id(manager: InterpreterManager, package_dir: Path) -> None:
    data = (package_dir / "conv.pt").read_bytes()
    first = manager.load_package(data)
    second = manager.load_package(package_dir / "conv.pt")
    third = manager.load_package(server_path="conv.pt")
    assert first.id == second.id == third.id
    assert first.id != manager.load_package(package_dir / "twin_b.pt").id


def test_package_larger_than_grpc_default_message(manager: InterpreterManager, package_dir: Path) -> None:
    assert (package_dir / "big.pt").stat().st_size > 4 * 1024 * 1024
    linear = manager.load_package(package_dir / "big.pt").load_pickle("big", "model.pkl")
    x = torch.ones(2, 1200)
    assert linear(x).shape == (2, 1200)


def test_two_packages_with_the_same_module_name_stay_isolated(manager: InterpreterManager, package_dir: Path) -> None:
    twin_a = manager.load_package(package_dir / "twin_a.pt").load_pickle("twins", "twin.pkl")
    twin_b = manager.load_package(package_dir / "twin_b.pt").load_pickle("twins", "twin.pkl")
    assert set(on_every_worker(manager, twin_a, lambda twin: twin()).values()) == {"a"}  # every worker holds both
    assert set(on_every_worker(manager, twin_b, lambda twin: twin()).values()) == {"b"}


def test_extern_numpy_dependency(models: Package) -> None:
    scale = models.load_pickle("models", "scale.pkl")
    assert scale.call_method("numpy_total", torch.arange(5)) == 10.0


def test_extra_sys_paths_reach_every_worker(manager: InterpreterManager, package_dir: Path) -> None:
    model = manager.load_package(package_dir / "uses_extra.pt").load_pickle("extra", "model.pkl")
    assert set(on_every_worker(manager, model, lambda replica: replica(7)).values()) == {21}


def test_register_module_source(manager: InterpreterManager, models: Package) -> None:
    manager.register_module_source("deployd_test_registered", "def greet(name):\n    return 'hello ' + name\n")
    scale = models.load_pickle("models", "scale.pkl")
    answers = on_every_worker(
        manager, scale, lambda replica: replica.call_method("call_module", "deployd_test_registered", "greet", "x")
    )
    assert set(answers.values()) == {"hello x"}
    assert "deployd_test_registered" in manager.status().modules
