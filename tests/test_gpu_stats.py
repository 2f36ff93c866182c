"""GPU memory per worker and utilisation per GPU (server.pool.gpustats, NVML) on Status and
/metrics, with a stand-in for pynvml: and nothing at all, never an error, without NVML."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest

from server.api.metrics import Metrics
from server.pool.gpustats import GpuStats, GpuUsage


class FakeNvml:
    """pynvml's calls that GpuStats makes, over two GPUs."""

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init = fail_init
        self.reads = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        self.reads += 1
        if handle == 0:
            return [SimpleNamespace(pid=101, usedGpuMemory=500 << 20), SimpleNamespace(pid=102, usedGpuMemory=None)]
        return [SimpleNamespace(pid=103, usedGpuMemory=2**64 - 1)]  # NVML_VALUE_NOT_AVAILABLE

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=40 + handle, memory=0)


def test_gpu_stats_read_nvml() -> None:
    nvml = FakeNvml()
    stats = GpuStats(nvml)
    assert stats.device_count() == 2
    assert stats.usage(101, 0) == GpuUsage(500 << 20, 40.0)
    assert stats.usage(102, 0) == GpuUsage(None, 40.0)  # NVML cannot tell this one's memory
    assert stats.usage(103, 1) == GpuUsage(None, 41.0)
    assert stats.usage(999, 1) == GpuUsage(None, 41.0)  # not on the GPU (yet): no memory there
    assert stats.usage(101, -1) is None  # a worker bound to no GPU
    assert stats.usage(101, 5) is None  # a GPU NVML does not see
    assert stats.utilization() == {0: 40.0, 1: 41.0}
    assert nvml.reads == 2  # one reading a second, however often asked


def test_without_nvml_gpu_stats_say_nothing() -> None:
    stats = GpuStats(FakeNvml(fail_init=True))
    assert stats.device_count() is None
    assert stats.usage(101, 0) is None and stats.utilization() == {}
    stats.close()


def test_gpu_gauges_on_metrics() -> None:
    readings: list[tuple[int, int, GpuUsage]] = []
    metrics = Metrics()
    metrics.watch(lambda: 0, lambda: 0, lambda: 0, lambda: 0, list, gpu_usage=lambda: readings)
    try:
        assert b"gpu" not in generate_latest(metrics.registry)  # no GPUs: no series at all
        readings[:] = [(0, 0, GpuUsage(500 << 20, 40.0)), (1, 0, GpuUsage(None, 40.0)), (2, 1, GpuUsage(7, None))]
        text = generate_latest(metrics.registry).decode()
        assert 'deployd_worker_gpu_memory_bytes{gpu="0",worker="0"} 5.24288e+08' in text
        assert 'deployd_worker_gpu_memory_bytes{gpu="1",worker="2"} 7.0' in text
        assert 'worker="1"' not in text  # unknown memory: no sample rather than a made-up one
        assert 'deployd_gpu_utilization_percent{gpu="0"} 40.0' in text
        assert 'deployd_gpu_utilization_percent{gpu="1"}' not in text
    finally:
        metrics.close()
