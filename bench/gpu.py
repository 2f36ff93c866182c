"""python -m bench.gpu --out DIR [--cpu-dry-run] [--callers 32] [--seconds 4]: the GPU checks.

On one GPU (DEVELOPERS.md: scripts/device_check.sh runs this), one real daemon with
`pool.gpus: [0=4]` (4 workers bound to GPU 0, weights held by GPU 0's keeper) serves:
- resnet (ResNet-18 of torch.nn, bench.batching's, random weights, eval) on cuda:0, unbatched;
- resnet_batched: the same package, batching {max_batch_size: 32, max_queue_delay_ms: 2};
- big: an nn.Linear of --big-mib MiB of weights on cuda:0, to see memory held once per GPU.

Checks, each printed and written to DIR/gpu.json:
1. correctness: the daemon's ResNet-18 output for a 2x3x224x224 input against the same model run
   here on the CPU (max abs difference; cuDNN may use TF32, so the tolerance is 1e-2);
2. memory: the GPU's used memory (NVML) before and after `big` is loaded on the 4 workers, and
   each daemon process's memory on it: one copy of the weights, not four;
3. a worker SIGKILLed: the seconds until its slot serves again, that it answers as before, and
   the GPU's used memory after (the replacement maps the keeper's copy, loads no copy);
4. bench: --callers threads calling resnet, then resnet_batched, for --seconds each, two
   interleaved rounds: calls/s, p50, p99, and batched / unbatched.

--cpu-dry-run: the same steps on the CPU (no pool.gpus, device cpu, no NVML), with small sizes:
it checks that the script runs here, not how fast anything is. Every loop is bounded by time
and count; the daemon is stopped in a finally (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.batching import export_resnet
from bench.common import Daemon, percentile, wait_until

MIB = 1 << 20


def build_packages(directory: Path, big_mib: int) -> None:
    """resnet.pt (bench.batching's ResNet-18) and big.pt (one nn.Linear of about big_mib MiB)."""
    import torch
    from torch.package import PackageExporter

    export_resnet({"out": str(directory / "resnet.pt")})
    side = int((big_mib * MIB / 4) ** 0.5)
    big = torch.nn.utils.skip_init(torch.nn.Linear, side, side, bias=False)  # no random init of GiBs
    with torch.no_grad():
        big.weight.fill_(1e-3)
    with PackageExporter(str(directory / "big.pt")) as exporter:
        exporter.save_pickle("model", "model.pkl", big)


class Nvml:
    """NVML's view of GPU 0 (None everywhere without pynvml or a GPU)."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml: Any = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as error:
            print(f"NVML: not available ({type(error).__name__}: {error})")
            self._nvml = None

    def used(self) -> int | None:
        if self._nvml is None:
            return None
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def per_process(self) -> dict[int, int | None]:
        if self._nvml is None:
            return {}
        running = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        return {int(item.pid): item.usedGpuMemory for item in running}


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.0f} MiB"


def check_correctness(manager: Any, resnet_path: Path, results: dict[str, Any]) -> None:
    import torch
    from torch.package import PackageImporter

    torch.manual_seed(1)
    x = torch.rand(2, 3, 224, 224)
    local = PackageImporter(str(resnet_path)).load_pickle("model", "model.pkl").eval()
    with torch.no_grad():
        expected = local(x)
    got = manager.model("resnet")(x)
    difference = float((got - expected).abs().max())
    results["correctness"] = {
        "max_abs_difference": difference,
        "allclose_1e-2": bool(torch.allclose(got, expected, atol=1e-2, rtol=1e-2)),
        "result_device": str(got.device),
    }
    print(f"1. ResNet-18 on the daemon vs here on the CPU: max |difference| {difference:.2e}", flush=True)


def check_memory(manager: Any, nvml: Nvml, daemon_pid: int, big_mib: int, device: str, results: dict[str, Any]) -> Any:
    used_before = nvml.used()
    package = manager.load_package(str(results["packages"] / "big.pt"))
    started = time.monotonic()
    big = package.load_pickle("model", "model.pkl", name="big", device=device)
    load_seconds = time.monotonic() - started
    used_after = nvml.used()
    workers = {worker.index: worker.pid for worker in manager.status().workers}
    processes = nvml.per_process()
    keepers = {pid: memory for pid, memory in processes.items() if pid not in workers.values() and pid != os.getpid()}
    side = int((big_mib * MIB / 4) ** 0.5)
    weights = side * side * 4
    delta = None if used_before is None or used_after is None else used_after - used_before
    results["memory"] = {
        "weights_bytes": weights,
        "load_seconds": load_seconds,
        "gpu_used_before_bytes": used_before,
        "gpu_used_after_bytes": used_after,
        "gpu_used_delta_bytes": delta,
        "delta_over_weights": None if delta is None else delta / weights,
        "workers_bytes": {str(slot): processes.get(pid) for slot, pid in workers.items()},
        "other_processes_bytes": {str(pid): memory for pid, memory in keepers.items()},
        "status_gpu_memory_bytes": {
            str(worker.index): worker.gpu_memory_bytes if worker.HasField("gpu_memory_bytes") else None
            for worker in manager.status().workers
        },
    }
    print(
        f"2. big ({_mib(weights)} of weights) on {len(workers)} workers: GPU used {_mib(used_before)} ->"
        f" {_mib(used_after)} (+{_mib(delta)}, {results['memory']['delta_over_weights']} x the weights)"
        f" in {load_seconds:.1f}s",
        flush=True,
    )
    for slot, pid in workers.items():
        print(f"   worker {slot} (pid {pid}): {_mib(processes.get(pid))} on the GPU (NVML)")
    for pid, memory in keepers.items():
        print(f"   other process {pid} (the keeper; daemon pid {daemon_pid}): {_mib(memory)} on the GPU (NVML)")
    return big


def check_replacement(manager: Any, big: Any, nvml: Nvml, results: dict[str, Any]) -> None:
    import torch

    x = torch.ones(1, int((results["memory"]["weights_bytes"] / 4) ** 0.5))
    before = big(x)
    used_before = nvml.used()
    victim = next(worker for worker in manager.status().workers if worker.index == 0)
    started = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)

    def replaced() -> bool:
        worker = next(worker for worker in manager.status().workers if worker.index == 0)
        return worker.pid != victim.pid and worker.state == "idle"

    serving = wait_until(replaced, 120)
    seconds = time.monotonic() - started
    answers = [bool(torch.allclose(big(x), before, rtol=1e-5, atol=1e-5)) for _ in range(8)]  # every worker, in turn
    used_after = nvml.used()
    delta = None if used_before is None or used_after is None else used_after - used_before
    results["replacement"] = {
        "replaced": serving,
        "seconds": seconds,
        "answers_as_before": all(answers),
        "gpu_used_before_bytes": used_before,
        "gpu_used_after_bytes": used_after,
        "gpu_used_delta_bytes": delta,
    }
    print(
        f"3. worker 0 SIGKILLed: serving again after {seconds:.1f}s ({serving}); answers as before: {all(answers)};"
        f" GPU used {_mib(used_before)} -> {_mib(used_after)} ({_mib(delta)} more)",
        flush=True,
    )


def _window(model: Any, x: Any, callers: int, seconds: float, max_calls: int) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def caller() -> None:
        mine = []
        while time.monotonic() < deadline and len(mine) < max_calls:
            started = time.perf_counter()
            model(x)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    return latencies


def bench_batching(manager: Any, callers: int, seconds: float, image: int, results: dict[str, Any]) -> None:
    import torch

    x = torch.rand(1, 3, image, image)
    rows: dict[str, list[dict[str, float]]] = {"resnet": [], "resnet_batched": []}
    for name in rows:
        _window(manager.model(name), x, callers, min(1.0, seconds), 50)  # warm-up, not counted
    for _ in range(2):
        for name in rows:
            latencies = _window(manager.model(name), x, callers, seconds, 100_000)
            rows[name].append(
                {
                    "calls_per_second": len(latencies) / seconds,
                    "p50_ms": percentile(latencies, 50) * 1e3,
                    "p99_ms": percentile(latencies, 99) * 1e3,
                }
            )
    summary = {
        name: {key: statistics.median(row[key] for row in windows) for key in windows[0]}
        for name, windows in rows.items()
    }
    ratio = summary["resnet_batched"]["calls_per_second"] / max(summary["resnet"]["calls_per_second"], 1e-9)
    results["bench"] = {"callers": callers, "seconds": seconds, "image": image, "rounds": rows, "median": summary}
    results["bench"]["batched_over_unbatched_calls_per_second"] = ratio
    print(f"4. ResNet-18 1x3x{image}x{image} at {callers} callers, {seconds:g}s windows, 2 rounds (medians):")
    for name, row in summary.items():
        print(
            f"   {name}: {row['calls_per_second']:.0f} calls/s, p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms"
        )
    print(f"   batched / unbatched calls/s: {ratio:.2f}", flush=True)


def run(out: Path, cpu_dry_run: bool, callers: int, seconds: float, big_mib: int) -> dict[str, Any]:
    from client import InterpreterManager

    device = "cpu" if cpu_dry_run else "cuda:0"
    image = 64 if cpu_dry_run else 224
    results: dict[str, Any] = {"cpu_dry_run": cpu_dry_run, "device": device}
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    packages = work / "packages"
    packages.mkdir()
    started = time.monotonic()
    build_packages(packages, big_mib)
    results["build_seconds"] = time.monotonic() - started
    results["packages"] = packages
    pool: dict[str, Any] = {"workers": 4, "start_timeout_seconds": 120.0}
    if not cpu_dry_run:
        pool = {"workers": 0, "gpus": ["0=4"], "start_timeout_seconds": 120.0}
    resnet = {"package": "resnet.pt", "pickle": "model:model.pkl", "device": device}
    config = {
        "pool": pool,
        "packages": {"directory": str(packages)},
        "server": {"shutdown_grace_seconds": 5.0, "log_calls": False},
        "models": [
            {"name": "resnet", **resnet},
            {"name": "resnet_batched", **resnet, "batching": {"max_batch_size": 32, "max_queue_delay_ms": 2}},
        ],
    }
    nvml = Nvml()
    results["gpu_used_idle_bytes"] = nvml.used()
    with Daemon(work, 4, config=config) as daemon, InterpreterManager(daemon.target, timeout=300) as manager:
        results["daemon_start_seconds"] = time.monotonic() - started - results["build_seconds"]
        results["gpu_used_serving_bytes"] = nvml.used()
        print(
            f"0. daemon serving ({device}, 4 workers) in {results['daemon_start_seconds']:.1f}s;"
            f" GPU used {_mib(results['gpu_used_idle_bytes'])} idle, {_mib(results['gpu_used_serving_bytes'])}"
            " with ResNet-18 loaded (4 worker contexts + the keeper)",
            flush=True,
        )
        results["workers_gpu"] = [worker.gpu if worker.HasField("gpu") else -1 for worker in manager.status().workers]
        check_correctness(manager, packages / "resnet.pt", results)
        big = check_memory(manager, nvml, daemon.pid, big_mib, device, results)
        check_replacement(manager, big, nvml, results)
        big.unload()
        bench_batching(manager, callers, seconds, image, results)
    results["packages"] = str(packages)
    results["total_seconds"] = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"written {out / 'gpu.json'} after {results['total_seconds']:.0f}s")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    parser.add_argument("--cpu-dry-run", action="store_true", help="the same steps on the CPU, small sizes")
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--big-mib", type=int, default=0, help="weights of the memory check's model (default 2048)")
    options = parser.parse_args(argv)
    big_mib = options.big_mib or (16 if options.cpu_dry_run else 2048)
    seconds = min(options.seconds, 1.0) if options.cpu_dry_run else options.seconds
    run(options.out, options.cpu_dry_run, options.callers, seconds, big_mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
