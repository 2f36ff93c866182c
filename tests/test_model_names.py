"""Models served by name: versions, hot swap with zero failed calls, pinning, unloading a name."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from client import InterpreterManager, InvalidArgumentError, NotFoundError
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, wait_until


def versions_of(manager: InterpreterManager, name: str) -> dict[int, str]:
    for model in manager.status().models:
        if model.name == name:
            return {version.version: version.state for version in model.versions}
    return {}


def test_a_name_serves_its_latest_version_and_unloads_with_all_of_them(
    manager: InterpreterManager, package_dir: Path
) -> None:
    twin_a = manager.load_package(package_dir / "twin_a.pt")
    twin_b = manager.load_package(package_dir / "twin_b.pt")
    first = twin_a.load_pickle("twins", "twin.pkl", name="names-twin")
    assert (first.id, first.version) == ("names-twin", 1) and first.object_id.startswith("obj-")
    model = manager.model("names-twin")
    assert model() == "a"
    second = twin_b.load_pickle("twins", "twin.pkl", name="names-twin")
    assert second.version == 2
    assert model() == "b" and first() == "b", "a handle follows the name"
    # The old version had no call running: it is gone at once; its object id with it.
    assert versions_of(manager, "names-twin") == {2: "serving"}
    with pytest.raises(NotFoundError, match="no version 1"):
        manager.model("names-twin", version=1)()
    assert manager.model("names-twin", version=2)() == "b"
    assert manager.model(second.object_id)() == "b", "a version's object id works too"
    model.unload()
    with pytest.raises(NotFoundError, match="no model 'names-twin' is loaded"):
        model()
    assert versions_of(manager, "names-twin") == {}
    for package in (twin_a, twin_b):
        package.unload()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("has space", "not a valid model name"),
        ("x" * 129, "not a valid model name"),
        ("obj-resnet", "'obj-' begins object ids"),
    ],
    ids=["space", "too-long", "object-id"],
)
def test_a_bad_name_is_invalid(manager: InterpreterManager, package_dir: Path, name: str, message: str) -> None:
    package = manager.load_package(package_dir / "twin_a.pt")
    with pytest.raises(InvalidArgumentError, match=message):
        package.load_pickle("twins", "twin.pkl", name=name)
    with pytest.raises(NotFoundError, match="no model 'never-loaded' is loaded"):
        manager.model("never-loaded")()


@pytest.fixture
def daemon_path_only(package_dir: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(write_config(tmp_path / "config.yaml", package_dir, pool={"data_ports": -1})).start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


def test_calls_resolved_to_the_old_version_finish_there(daemon_path_only: DaemonProcess, package_dir: Path) -> None:
    """Two calls keep both workers busy and a third waits for one, all on version 1; then version 2
    is loaded (the load waits for the busy workers). The waiting call still runs on version 1,
    which drains and is unloaded after it. A daemon without data ports: its queue is what this
    is about (on data ports the swap is test_data_ports' and test_hot_swap_under_load's)."""
    with InterpreterManager(daemon_path_only.target, timeout=60) as manager:
        package = manager.load_package(package_dir / "models.pt")
        old = package.load_pickle("models", "scale.pkl", name="slow")
        outcomes: list[dict[str, Any]] = []

        def nap() -> threading.Thread:
            outcome: dict[str, Any] = {}
            outcomes.append(outcome)
            thread = threading.Thread(target=lambda: outcome.update(pid=manager.model("slow").call_method("nap", 1.5)))
            thread.start()
            return thread

        threads = [nap(), nap()]
        assert wait_until(lambda: sum(w.state == "busy" for w in manager.status().workers) == 2, 10)
        threads.append(nap())
        assert wait_until(lambda: manager.status().queued_calls == 1, 10)
        new = package.load_pickle("models", "scale.pkl", name="slow")
        assert versions_of(manager, "slow") == {1: "draining", 2: "serving"}
        assert torch.equal(manager.model("slow")(torch.ones(1)), torch.full((1,), 2.0))
        assert manager.model("slow", version=1).hasattr("nap"), "a draining version can still be pinned"
        for thread in threads:
            thread.join(30)
        assert all("pid" in outcome for outcome in outcomes), "a call on the old version failed"
        assert wait_until(lambda: versions_of(manager, "slow") == {2: "serving"}, 10), versions_of(manager, "slow")
        assert old.object_id not in {o.object_id for o in manager.status().objects}
        assert new.object_id in {o.object_id for o in manager.status().objects}


def test_hot_swap_under_load_fails_no_call(fresh_daemon: DaemonProcess, package_dir: Path) -> None:
    """8 threads call the name while it is swapped between two packages that answer differently."""
    with InterpreterManager(fresh_daemon.target, timeout=60) as manager:
        packages = {answer: manager.load_package(package_dir / f"twin_{answer}.pt") for answer in "ab"}
        packages["a"].load_pickle("twins", "twin.pkl", name="swapped")
        model = manager.model("swapped")
        answers: Counter[str] = Counter()
        failures: list[BaseException] = []
        stop = threading.Event()

        def caller() -> None:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    answers[model()] += 1
                except BaseException as error:
                    failures.append(error)

        threads = [threading.Thread(target=caller) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            for swap in range(6):
                answer = "b" if swap % 2 == 0 else "a"
                loaded = packages[answer].load_pickle("twins", "twin.pkl", name="swapped")
                assert loaded.version == swap + 2
                assert model() == answer, "once the load returned, new calls go to the new version"
                time.sleep(0.2)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert not failures, failures[:3]
        assert set(answers) == {"a", "b"} and sum(answers.values()) > 50, answers
        assert wait_until(lambda: versions_of(manager, "swapped") == {7: "serving"}, 10), versions_of(
            manager, "swapped"
        )
