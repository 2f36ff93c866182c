"""Dynamic batching on the real daemon: concurrent calls joined into one model call and split
back to the right callers, through deployd.v1 and KServe v2 alike."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import yaml

from client import Batching, InterpreterManager, InvalidArgumentError, UnavailableError
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, wait_until
from tests.test_operations import sample, scrape

PROBE = {"max_batch_size": 16, "max_queue_delay_ms": 5}
MODELS = [
    {"name": "probe", "package": "models.pt", "pickle": "models:batch_probe.pkl", "batching": PROBE},
    {"name": "badsplit", "package": "models.pt", "pickle": "models:bad_split.pkl", "batching": {"max_batch_size": 8}},
]


@pytest.fixture(scope="module")
def batching_daemon(package_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    path = tmp_path_factory.mktemp("batching") / "config.yaml"
    write_config(path, package_dir)
    config = yaml.safe_load(path.read_text())
    config["models"] = MODELS
    path.write_text(yaml.safe_dump(config))
    process = DaemonProcess(path, "--metrics-address", "127.0.0.1:0").start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


def run_threads(count: int, work: Any) -> list[Any]:
    """work(index) in count threads at once; their results (or exceptions) in index order."""
    results: list[Any] = [None] * count
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        barrier.wait(timeout=30)
        try:
            results[index] = work(index)
        except Exception as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_each_caller_gets_its_own_rows_under_load_with_mixed_shapes(batching_daemon: DaemonProcess) -> None:
    """12 threads x 15 calls, every call distinct values; 1-3 rows, width 4 or 5, three kinds of
    keyword arguments: only alike calls join, and each caller gets exactly its rows back."""
    largest: list[int] = []

    def work(thread: int) -> int:
        seen = 0
        with InterpreterManager(batching_daemon.target, timeout=60) as manager:
            probe = manager.model("probe")
            for call in range(15):
                rows, width = 1 + (thread + call) % 3, 4 + thread % 2
                start = (thread * 100 + call) * 1000.0
                x = torch.arange(start, start + rows * width, dtype=torch.float32).reshape(rows, width)
                kind = thread % 3
                if kind == 0:
                    y, batch_rows = probe(x)
                    expected = x * 2
                elif kind == 1:
                    y, batch_rows = probe(x, scale=3.0)
                    expected = x * 3
                else:
                    answer = probe(x, as_dict=True)
                    y, batch_rows = answer["y"], answer["rows"]
                    expected = x * 2
                assert torch.equal(y, expected), (thread, call)
                assert batch_rows.shape == (rows,) and bool((batch_rows >= rows).all())
                seen = max(seen, int(batch_rows[0]))
        return seen

    results = run_threads(12, work)
    for result in results:
        if isinstance(result, BaseException):
            raise result
        largest.append(result)
    assert max(largest) > 3, f"no call was batched with another: largest batches {largest}"
    metrics = scrape(batching_daemon)
    assert sample(metrics, "deployd_batch_size_count", model="probe") > 0
    assert sample(metrics, "deployd_batch_queue_delay_seconds_count", model="probe") >= 12 * 15


def test_a_result_that_does_not_split_fails_its_callers(batching_daemon: DaemonProcess) -> None:
    def work(thread: int) -> Any:
        with InterpreterManager(batching_daemon.target, timeout=60) as manager:
            return manager.model("badsplit")(torch.ones(2, 3))

    results = run_threads(4, work)
    assert all(isinstance(result, InvalidArgumentError) for result in results), results
    assert "does not split into its callers' rows" in str(results[0])


def test_kserve_v2_calls_go_through_the_same_batcher(batching_daemon: DaemonProcess) -> None:
    def work(thread: int) -> tuple[np.ndarray, np.ndarray]:
        client = triton.InferenceServerClient(batching_daemon.target)
        x = np.full((1, 4), thread, dtype=np.float32)
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        try:
            answers = [client.infer("probe", [tensor]) for _ in range(10)]
        finally:
            client.close()
        for answer in answers:
            assert (answer.as_numpy("output0") == x * 2).all()
        return x, max(int(answer.as_numpy("output1")[0]) for answer in answers)

    results = run_threads(8, work)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    assert max(rows for _, rows in results) > 1


def test_a_worker_crash_fails_its_batch_and_the_model_serves_on(batching_daemon: DaemonProcess) -> None:
    def work(thread: int) -> Any:
        with InterpreterManager(batching_daemon.target, timeout=60) as manager:
            x = torch.full((1, 4), -999.0 if thread == 0 else float(thread))
            return manager.model("probe")(x)

    results = run_threads(6, work)
    assert isinstance(results[0], UnavailableError), results[0]
    for result in results[1:]:  # in the poison call's batch (UNAVAILABLE), or in another (answered)
        assert isinstance(result, (UnavailableError, tuple)), result
    with InterpreterManager(batching_daemon.target, timeout=60) as manager:
        probe = manager.model("probe")

        def serves() -> bool:
            try:
                return bool(torch.equal(probe(torch.ones(1, 4))[0], torch.full((1, 4), 2.0)))
            except UnavailableError:
                return False

        assert wait_until(serves, 60)


def test_batching_by_load_pickle(fresh_daemon: DaemonProcess, package_dir: Path) -> None:
    with InterpreterManager(fresh_daemon.target, timeout=60) as manager:
        package = manager.load_package(package_dir / "models.pt")
        model = package.load_pickle("models", "batch_probe.pkl", name="probed", batching=Batching(4, 1.0, (2, 4)))
        y, rows = model(torch.ones(3, 2))
        assert torch.equal(y, torch.full((3, 2), 2.0)) and rows.tolist() == [3, 3, 3]
        with pytest.raises(InvalidArgumentError, match="with a name"):
            package.load_pickle("models", "batch_probe.pkl", batching=Batching(4))
        with pytest.raises(InvalidArgumentError, match="preferred_batch_sizes"):
            package.load_pickle("models", "batch_probe.pkl", name="p2", batching=Batching(4, 1.0, (8,)))
