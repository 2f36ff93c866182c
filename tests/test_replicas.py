"""Several replicas behind one target: plain daemons serving the same model repository, callers
spreading over them with gRPC's own round_robin, and changes through such a target refused."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import torch
import yaml

from client import FailedPreconditionError, InterpreterManager, Retry
from client._replicas import dns_host_and_port, listed_addresses, replicas_now
from client.aio import AsyncInterpreterManager
from server.pool.procinfo import alive, descendants_of
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, shm_segments, wait_until

MODEL = "scale"


@pytest.fixture
def replicas(package_dir: Path, tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    """Two daemons on one config whose model repository serves `scale` by name."""
    config = write_config(tmp_path / "config.yaml", package_dir, pool={"workers": 1})
    settings = yaml.safe_load(config.read_text())
    settings["models"] = [{"name": MODEL, "package": "models.pt", "pickle": "models:scale.pkl"}]
    config.write_text(yaml.safe_dump(settings))
    daemons = [DaemonProcess(config).start(), DaemonProcess(config).start()]
    yield daemons
    for daemon in daemons:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.assert_clean_stop()


def balanced_target(daemons: list[DaemonProcess]) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{daemon.port}" for daemon in daemons)


def worker_pids(daemon: DaemonProcess) -> set[int]:
    with InterpreterManager(daemon.target, timeout=30) as manager:
        return {worker.pid for worker in manager.status().workers}


def test_calls_by_name_spread_over_every_replica(replicas: list[DaemonProcess]) -> None:
    owner = {pid: index for index, daemon in enumerate(replicas) for pid in worker_pids(daemon)}
    with InterpreterManager(balanced_target(replicas), timeout=30) as manager:
        model = manager.model(MODEL)
        assert torch.equal(model(torch.ones(3)), torch.full((3,), 2.0))
        served_by = [owner[model.call_method("pid")] for _ in range(20)]
    # round_robin alternates between the two; pick_first (gRPC's default) would give one.
    assert served_by.count(0) >= 5 and served_by.count(1) >= 5, served_by


def test_a_replica_killed_under_load_costs_callers_nothing_with_retries(replicas: list[DaemonProcess]) -> None:
    victim, survivor = replicas
    survivor_pids = worker_pids(survivor)
    outcomes: list[tuple[float, int | BaseException]] = []
    stop = threading.Event()
    retry = Retry(attempts=5, backoff_seconds=0.05, max_backoff_seconds=0.5)

    with InterpreterManager(balanced_target(replicas), timeout=30, retry=retry) as manager:
        model = manager.model(MODEL)

        def caller() -> None:
            for _ in range(2000):  # bounded: the stop event ends it long before
                if stop.is_set():
                    return
                try:
                    outcomes.append((time.monotonic(), model.call_method("pid")))
                except Exception as error:  # every failure is the test's business
                    outcomes.append((time.monotonic(), error))

        threads = [threading.Thread(target=caller) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            assert wait_until(lambda: len(outcomes) >= 40, 30), "callers should be under way"
            children = victim.children = descendants_of(victim.pid)
            victim.process.kill()  # type: ignore[union-attr]
            killed_at = time.monotonic()
            victim.process.wait(10)  # type: ignore[union-attr]
            assert wait_until(lambda: sum(t > killed_at + 0.5 for t, _ in outcomes) >= 40, 30)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        failures = [outcome for _, outcome in outcomes if isinstance(outcome, BaseException)]
        assert not failures, f"{len(failures)} of {len(outcomes)} calls failed: {failures[:3]}"
        after = [pid for t, pid in outcomes if t > killed_at + 0.5]
        assert set(after) <= survivor_pids, "once the replica is gone every call goes to the survivor"

    # What the killed daemon left: its workers die with it; its segments are ours to remove
    # (a daemon that starts removes a dead one's, see server.ipc.shm.remove_stale_segments).
    assert wait_until(lambda: not any(alive(pid) for pid in children), 10)
    for name in shm_segments():
        if name.startswith(f"deployd-{victim.pid}-"):
            os.unlink(f"/dev/shm/{name}")


def test_changes_through_several_replicas_are_refused_and_nothing_is_sent(
    replicas: list[DaemonProcess], package_dir: Path
) -> None:
    target = balanced_target(replicas)
    with InterpreterManager(target, timeout=30) as manager:
        for change in (
            lambda: manager.load_package(package_dir / "models.pt"),
            lambda: manager.register_module_source("refused_module", "X = 1\n"),
            lambda: manager.reload(),
            lambda: manager.model(MODEL).unload(),
        ):
            with pytest.raises(FailedPreconditionError, match="one of its 2 replicas") as raised:
                change()
            assert raised.value.code.name == "FAILED_PRECONDITION"
            assert "model repository" in raised.value.details
        assert manager.model(MODEL).hasattr("factor"), "calls still go through"

    async def through_aio() -> None:
        async with AsyncInterpreterManager(target, timeout=30) as manager:
            with pytest.raises(FailedPreconditionError, match="one of its 2 replicas"):
                await manager.load_package(package_dir / "models.pt")
            assert torch.equal(await manager.model(MODEL)(torch.ones(2)), torch.full((2,), 2.0))

    asyncio.run(through_aio())
    for daemon in replicas:
        with InterpreterManager(daemon.target, timeout=30) as direct:
            status = direct.status()
            assert len(status.packages) == 1, "only the repository's package, on each replica"
            assert "refused_module" not in status.modules


def test_a_dns_target_of_one_address_is_one_daemon(replicas: list[DaemonProcess], package_dir: Path) -> None:
    target = f"dns:///127.0.0.1:{replicas[0].port}"
    assert replicas_now(target) == 1
    with InterpreterManager(target, timeout=30) as manager:
        package = manager.load_package(package_dir / "models.pt")  # not refused: one daemon
        assert torch.equal(manager.model(MODEL)(torch.ones(1)), torch.full((1,), 2.0))
        assert package.id


@pytest.mark.parametrize(
    ("target", "listed", "dns"),
    [
        ("127.0.0.1:50051", None, None),
        ("localhost:50051", None, None),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", ["10.0.0.1:1", "10.0.0.2:1"], None),
        ("ipv6:[::1]:1", ["[::1]:1"], None),
        (
            "dns:///deployd-headless.ml.svc:50051",
            None,
            ("deployd-headless.ml.svc", "50051"),
        ),
        ("dns://8.8.8.8/models.example:9000", None, ("models.example", "9000")),
        ("dns:models.example:9000", None, ("models.example", "9000")),
        ("dns:///[::1]:7", None, ("::1", "7")),
        ("dns:///models.example", None, ("models.example", "443")),
    ],
)
def test_targets_are_read_as_grpc_reads_them(
    target: str, listed: list[str] | None, dns: tuple[str, str] | None
) -> None:
    assert listed_addresses(target) == listed
    assert dns_host_and_port(target) == dns
    if listed is None and dns is None:
        assert replicas_now(target) == 1, "a plain host:port is one daemon, whatever it resolves to"


def connectivity_after_one_call(target: str, watch_seconds: float) -> list[grpc.ChannelConnectivity]:
    states: list[grpc.ChannelConnectivity] = []
    with InterpreterManager(target, timeout=30) as manager:
        manager._channel.subscribe(states.append)
        manager.status()
        time.sleep(watch_seconds)
        manager.status()  # after a GOAWAY the next call simply connects again
        manager._channel.unsubscribe(states.append)
    return states[states.index(grpc.ChannelConnectivity.READY) :]


def test_connection_age_sends_clients_back_to_the_resolver(
    daemon: DaemonProcess, package_dir: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "config.yaml", package_dir, pool={"workers": 1}, server={"max_connection_age_seconds": 0.5}
    )
    aging = DaemonProcess(config).start()
    try:
        # The channel leaves READY when the daemon closes the connection (GOAWAY at the age):
        # a dns: target resolves again then, finding replicas started since.
        assert set(connectivity_after_one_call(aging.target, 2.0)) != {grpc.ChannelConnectivity.READY}
    finally:
        aging.assert_clean_stop()
    assert set(connectivity_after_one_call(daemon.target, 2.0)) == {grpc.ChannelConnectivity.READY}, "off by default"
