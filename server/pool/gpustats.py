"""GPU memory per worker and utilisation per GPU, from NVML (nvidia-ml-py's `pynvml`, optional).

NVML asks the driver, not CUDA: the daemon may use it without starting CUDA (which would break
the workers forked after it). NVML numbers its GPUs in PCI bus order; workers see theirs in the
same order (CUDA_DEVICE_ORDER=PCI_BUS_ID, server.worker.boot.bind_gpu), so pool.gpus means the
same GPU to both. Without pynvml, a driver or a GPU, every answer is "unknown" (None, nothing):
never an error. Readings are cached for a second: Status and /metrics may be polled often.
Imports no grpc, nor torch.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

_CACHE_SECONDS = 1.0


class GpuUsage(NamedTuple):
    memory_bytes: int | None  # what this process holds on its GPU (None: NVML cannot tell)
    utilization_percent: float | None  # its GPU's, over NVML's last sample period


class GpuStats:
    def __init__(self, nvml: Any = None) -> None:
        """nvml: the pynvml module (the tests give a stand-in); None: import it if installed."""
        self._nvml = nvml
        self._started = False
        self._failed = False
        self._read_at = -1e9
        self._processes: dict[int, dict[int, int | None]] = {}  # gpu -> pid -> bytes
        self._utilization: dict[int, float] = {}

    def _start(self) -> Any:
        """pynvml, initialised, or None (logged once) when there is no NVML."""
        if self._started or self._failed:
            return self._nvml if self._started else None
        try:
            nvml = self._nvml if self._nvml is not None else importlib.import_module("pynvml")
            nvml.nvmlInit()
        except Exception as error:  # no module, no library, no driver: all mean "unknown"
            self._failed = True
            log.info("GPU metrics off: NVML is not available (%s: %s)", type(error).__name__, error)
            return None
        self._nvml, self._started = nvml, True
        return nvml

    def device_count(self) -> int | None:
        """The GPUs NVML sees; None if it cannot tell."""
        nvml = self._start()
        if nvml is None:
            return None
        try:
            return int(nvml.nvmlDeviceGetCount())
        except Exception:
            return None

    def usage(self, pid: int, gpu: int) -> GpuUsage | None:
        """A process's memory on a GPU and that GPU's utilisation; None where NVML is absent."""
        if gpu < 0 or self._start() is None:
            return None
        self._refresh()
        if gpu not in self._processes and gpu not in self._utilization:
            return None
        return GpuUsage(self._processes.get(gpu, {}).get(pid), self._utilization.get(gpu))

    def utilization(self) -> dict[int, float]:
        """Every GPU's utilisation that NVML could read."""
        if self._start() is None:
            return {}
        self._refresh()
        return dict(self._utilization)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._read_at < _CACHE_SECONDS:
            return
        self._read_at = now
        nvml = self._nvml
        processes: dict[int, dict[int, int | None]] = {}
        utilization: dict[int, float] = {}
        for gpu in range(self.device_count() or 0):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(gpu)
            except Exception:
                continue
            try:
                running = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                processes[gpu] = {int(item.pid): _bytes(item.usedGpuMemory) for item in running}
            except Exception:
                pass
            with contextlib.suppress(Exception):
                utilization[gpu] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        self._processes, self._utilization = processes, utilization

    def close(self) -> None:
        if self._started:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._started = False


def _bytes(value: Any) -> int | None:
    """NVML's usedGpuMemory: bytes, or None when it is not available (e.g. in some containers)."""
    return int(value) if isinstance(value, int) and 0 <= value < _NOT_AVAILABLE else None


_NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE, as older pynvml passes it on
