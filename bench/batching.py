"""Batching: what dynamic batching (server.batching) buys, side by side with the same model unbatched.

One real daemon (2 workers, `pool.workers: 2`, metrics on 127.0.0.1 port 0) serves each model
twice by name from its config's `models:`, from the same package: once plain, once with
`batching:` on. The same client code calls both, `manager.model(name)(x)` from N threads on
one InterpreterManager (as bench.v2load drives deployd.v1), in interleaved rounds (the order
of the two flips every round), every window after an uncounted warm-up window:

- seed (scripts/export_seed.py: two convolutions), input 1x1x10x10 float32 a call, batching
  {max_batch_size: 32, max_queue_delay_ms: 2}, at 1, 8 and 32 callers;
- resnet18: a ResNet-18 built here from torch.nn (BasicBlocks, 64/128/256/512 channels,
  [2, 2, 2, 2]; random weights, eval mode), input 1x3x224x224 float32 a call, batching
  {max_batch_size: 16, max_queue_delay_ms: 2}, at 8 and 32 callers (--smoke: 64x64).

Printed per model and level: calls/s, p50 and p99 of both, batched / unbatched for calls/s
and p50 (the median over rounds of the ratio within a round); for the batched windows the
mean batch size and how the batch sizes spread (deltas of the daemon's `deployd_batch_size`
histogram around each measured window) and the mean time a call waited in the batcher
(`deployd_batch_queue_delay_seconds`); and CPU time per call of the daemon, its workers, the
load generator and the whole host (/proc/stat: every process and the kernel), and how busy
the cores were, over all measured windows. Target: seed at 32 callers, batched /
unbatched calls/s >= 3x. One caller (seed): p50 batched / unbatched, the batcher's cost
without load (by design a lone call is not delayed; no target). Before the load, one call
of each batched model must answer what the unbatched one does (within float tolerance: a
batch may take another convolution algorithm).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import types
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    BenchError,
    Context,
    Daemon,
    Samples,
    paired_ratios,
    percentile,
    ratio,
    run_in_child,
    threaded_window,
    wait_until,
)
from bench.v2load import cpu_seconds, export_seed, spread
from server.pool.procinfo import descendants_of

UNBATCHED = "unbatched"
BATCHED = "batched"
STRATEGIES = (UNBATCHED, BATCHED)
WORKERS = 2
TARGET_RATIO = 3.0  # batched / unbatched calls/s, seed at 32 callers
TARGET_LEVEL = 32
BATCH_METRIC = "deployd_batch_size"
WAIT_METRIC = "deployd_batch_queue_delay_seconds"
CPU_KEYS = ("daemon_s", "workers_s", "client_s", "host_s")  # CPU seconds in the measured windows
_METRICS_URL = re.compile(r"metrics on (http://\S+)")
_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')

RESNET_MODULE = "bench_resnet18"
# The model's source, saved into the package as module bench_resnet18 (torch.package interns
# it): plain torch.nn, so the package needs nothing from this repository.
RESNET_SOURCE = '''"""A ResNet-18 of torch.nn: BasicBlocks, 64/128/256/512 channels, [2, 2, 2, 2]."""

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        blocks = []
        inplanes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes, 1)]
            inplanes = planes
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))
'''


@dataclass(frozen=True)
class Part:
    """One model measured: its names, input, batching policy and how long to measure it."""

    model: str  # the unbatched name; the batched one is model + "_batched"
    package: str  # file name in the daemon's packages directory
    shape: tuple[int, ...]
    max_batch_size: int
    max_queue_delay_ms: float
    levels: tuple[int, ...]  # callers (threads)
    rounds: int
    window_seconds: float
    warmup_seconds: float  # before every measured window, uncounted
    max_calls: int  # per window, all threads together

    @property
    def batched(self) -> str:
        return f"{self.model}_batched"

    def name_of(self, strategy: str) -> str:
        return self.batched if strategy == BATCHED else self.model

    @property
    def shape_text(self) -> str:
        return "x".join(map(str, self.shape))


@dataclass(frozen=True)
class Params:
    seed: Part
    resnet: Part


def _seed(levels: tuple[int, ...], rounds: int, window: float, warmup: float, max_calls: int) -> Part:
    return Part("seed", "seed.pt", (1, 1, 10, 10), 32, 2.0, levels, rounds, window, warmup, max_calls)


def _resnet(image: int, levels: tuple[int, ...], rounds: int, window: float, warmup: float, max_calls: int) -> Part:
    return Part("resnet18", "resnet18.pt", (1, 3, image, image), 16, 2.0, levels, rounds, window, warmup, max_calls)


FULL = Params(
    seed=_seed((1, 8, 32), rounds=5, window=1.5, warmup=0.3, max_calls=20000),
    resnet=_resnet(224, (8, 32), rounds=3, window=3.0, warmup=1.0, max_calls=2000),
)
SMOKE = Params(
    seed=_seed((1, 8, 32), rounds=1, window=0.3, warmup=0.1, max_calls=2000),
    resnet=_resnet(64, (8,), rounds=1, window=0.3, warmup=0.1, max_calls=200),
)


class BatchingDaemon(Daemon):
    """The daemon with metrics on, serving every part's model twice by name: plain and batched."""

    def __init__(self, workdir: Path, packages: dict[str, Path], parts: list[Part]) -> None:
        super().__init__(workdir, WORKERS)
        self.packages = packages
        self.parts = parts
        self.label = f"{self.label}, batched and unbatched models by name"
        self.metrics_url = ""

    def write_config(self) -> Path:
        path = super().write_config()
        for file_name, package in self.packages.items():
            shutil.copyfile(package, path.parent / "packages" / file_name)
        config = yaml.safe_load(path.read_text())
        config["metrics"] = {"address": "127.0.0.1:0"}
        config["models"] = [
            entry
            for part in self.parts
            for entry in (
                {"name": part.model, "package": part.package, "pickle": "model:model.pkl"},
                {
                    "name": part.batched,
                    "package": part.package,
                    "pickle": "model:model.pkl",
                    "batching": {"max_batch_size": part.max_batch_size, "max_queue_delay_ms": part.max_queue_delay_ms},
                },
            )
        ]
        path.write_text(yaml.safe_dump(config))
        return path

    def find_metrics_url(self, timeout: float = 30.0) -> str:
        """The metrics address the daemon logged (it binds port 0 too)."""

        def found() -> bool:
            match = next((m for m in map(_METRICS_URL.search, list(self.lines)) if m), None)
            if match:
                self.metrics_url = match.group(1)
            return bool(match)

        if not wait_until(found, timeout):
            raise BenchError(f"{self.label} logged no metrics address:\n{self.log}")
        return self.metrics_url


def export_resnet(spec: dict[str, Any]) -> dict[str, Any]:
    """(In a child.) Write spec["out"]: the ResNet-18 at module "model", file "model.pkl"."""
    import torch
    from torch.package import PackageExporter

    module = types.ModuleType(RESNET_MODULE)
    sys.modules[RESNET_MODULE] = module
    exec(compile(RESNET_SOURCE, f"<{RESNET_MODULE}>", "exec"), module.__dict__)
    torch.manual_seed(0)
    model = module.ResNet18().eval()
    out = Path(spec["out"])
    with PackageExporter(str(out)) as exporter:
        exporter.save_source_string(RESNET_MODULE, RESNET_SOURCE)
        exporter.save_pickle("model", "model.pkl", model)
    return {"path": str(out), "bytes": out.stat().st_size}


def run(ctx: Context) -> None:
    params = SMOKE if ctx.smoke else FULL
    parts = [params.seed, params.resnet]
    directory = ctx.workdir / "packages"
    seed = export_seed(directory)
    resnet = directory / "resnet18.pt"
    run_in_child("bench.batching:export_resnet", {"out": str(resnet)}, 300)
    daemon = BatchingDaemon(ctx.workdir, {"seed.pt": seed, "resnet18.pt": resnet}, parts)
    with daemon:
        spec = {
            "target": daemon.target,
            "daemon_pid": daemon.pid,
            "metrics_url": daemon.find_metrics_url(),
            "parts": [asdict(part) for part in parts],
        }
        windows = sum(part.rounds * len(part.levels) * 2 for part in parts)
        window = max(part.window_seconds + part.warmup_seconds for part in parts)
        result = run_in_child("bench.batching:side_by_side_load", spec, 300 + windows * (window + 30))
    for part in parts:
        report(ctx, part, result[part.model])


def report(ctx: Context, part: Part, result: dict[str, Any]) -> None:
    benchmark = f"batching_{part.model}"
    ctx.report.line(
        f"batching: {part.model}, {part.shape_text} float32 a call, batched as {part.batched}"
        f" (max_batch_size {part.max_batch_size}, max_queue_delay_ms {part.max_queue_delay_ms:g}):"
        f" one call answers as unbatched within {result['largest_difference']:.2g}"
    )
    for level in part.levels:
        samples = {strategy: Samples.from_json(result["samples"][strategy][str(level)]) for strategy in STRATEGIES}
        rows = {strategy: ctx.report.add(samples[strategy].row(benchmark, strategy, level)) for strategy in STRATEGIES}
        figures = "; ".join(
            f"{strategy} {rows[strategy].work_items_per_second:.1f}/s, p50 {rows[strategy].p50_latency:.3f} ms,"
            f" p99 {percentile(samples[strategy].latencies, 99) * 1000:.3f} ms"
            for strategy in STRATEGIES
        )
        rates = paired_ratios(samples[BATCHED].rates(), samples[UNBATCHED].rates())
        p50s = paired_ratios(samples[BATCHED].p50s(), samples[UNBATCHED].p50s())
        callers = "1 caller" if level == 1 else f"{level} callers"
        ratios = f"batched/unbatched calls/s {spread(rates)}, p50 {spread(p50s)}"
        ctx.report.line(f"batching: {part.model}, {callers}: {figures}; {ratios}")
        ctx.report.line(f"batching: {part.model}, {callers}, batched: {batch_text(result['batches'][str(level)])}")
        ctx.report.line(f"batching: {part.model}, {callers}, CPU per call: {cpu_text(result['cpu'], level)}")
        if part.model == "seed" and level == TARGET_LEVEL:
            ctx.report.check(f"batching: {part.model}, {callers}, batched/unbatched calls/s", rates, ">=", TARGET_RATIO)
        if part.model == "seed" and level == 1:
            ctx.report.line(
                f"batching: {part.model}, 1 caller (no load): p50 batched {rows[BATCHED].p50_latency:.3f} ms /"
                f" unbatched {rows[UNBATCHED].p50_latency:.3f} ms = {spread(p50s)}"
                " (the batcher's cost without load; by design a lone call is not delayed; no target)"
            )


def batch_text(stats: dict[str, Any]) -> str:
    """Mean batch size, the spread of sizes (histogram buckets) and the mean wait in the batcher."""
    count = stats["count"]
    if not count:
        return "no batches counted (deployd_batch_size did not move)"
    buckets = sorted((float(bound), int(total)) for bound, total in stats["buckets"].items() if bound != "+Inf")
    shares, below, lower = [], 0, 0.0
    for bound, cumulative in buckets:
        within = cumulative - below
        if within:
            low, high = int(lower) + 1, int(bound)
            sizes = str(high) if low == high else f"{low}-{high}"
            shares.append(f"{sizes}: {100 * within / count:.0f}%")
        below, lower = cumulative, bound
    mean_wait_ms = ratio(stats["wait_sum"], stats["wait_count"]) * 1000
    return (
        f"mean batch {stats['sum'] / count:.2f} rows over {count:.0f} batches (sizes {', '.join(shares)});"
        f" mean wait in the batcher {mean_wait_ms:.2f} ms"
    )


def cpu_text(cpu: dict[str, Any], level: int) -> str:
    """CPU time per call of the daemon, its workers, the load generator and the whole host (all
    processes, the kernel's too), and how busy the host's cores were in the measured windows."""
    parts = []
    for strategy in STRATEGIES:
        used = cpu[strategy][str(level)]
        per_call = {key: ratio(used[key], used["calls"]) * 1e6 for key in CPU_KEYS}
        busy = ratio(used["host_s"], used["elapsed_s"] * used["cores"])
        parts.append(
            f"{strategy} daemon {per_call['daemon_s']:.0f} us, workers {per_call['workers_s']:.0f} us,"
            f" load generator {per_call['client_s']:.0f} us, host {per_call['host_s']:.0f} us"
            f" (cores {100 * busy:.0f}% busy)"
        )
    return "; ".join(parts)


def host_cpu_seconds() -> float:
    """CPU time the whole host has spent (every process and the kernel), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- load generator (child)


def scrape(url: str, model: str) -> dict[str, Any]:
    """The batch histograms of one model from the daemon's /metrics: sums, counts and buckets."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found: dict[str, Any] = {"sum": 0.0, "count": 0.0, "wait_sum": 0.0, "wait_count": 0.0, "buckets": {}}
    names = {
        f"{BATCH_METRIC}_sum": "sum",
        f"{BATCH_METRIC}_count": "count",
        f"{WAIT_METRIC}_sum": "wait_sum",
        f"{WAIT_METRIC}_count": "wait_count",
    }
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        metric, label_text, value = match.groups()
        labels = dict(_LABEL.findall(label_text or ""))
        if labels.get("model") != model:
            continue
        if metric in names:
            found[names[metric]] = float(value)
        elif metric == f"{BATCH_METRIC}_bucket":
            found["buckets"][labels["le"]] = float(value)
    return found


def difference(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    moved = {key: after[key] - before[key] for key in ("sum", "count", "wait_sum", "wait_count")}
    moved["buckets"] = {bound: total - before["buckets"].get(bound, 0.0) for bound, total in after["buckets"].items()}
    return moved


def add_up(total: dict[str, Any], more: dict[str, Any]) -> None:
    for key in ("sum", "count", "wait_sum", "wait_count"):
        total[key] += more[key]
    for bound, count in more["buckets"].items():
        total["buckets"][bound] = total["buckets"].get(bound, 0.0) + count


def side_by_side_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Every part: its two names in interleaved rounds at each level. Returns Samples as JSON and stats."""
    from client import InterpreterManager

    with InterpreterManager(spec["target"], timeout=120) as manager:
        return {part["model"]: load_part(manager, spec, Part(**part)) for part in spec["parts"]}


def load_part(manager: Any, spec: dict[str, Any], part: Part) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(part.shape, generator=generator)
    models = {strategy: manager.model(part.name_of(strategy)) for strategy in STRATEGIES}
    answers = {strategy: models[strategy](x) for strategy in STRATEGIES}
    largest = float((answers[BATCHED] - answers[UNBATCHED]).abs().max())
    scale = float(answers[UNBATCHED].abs().max())
    if not torch.allclose(answers[BATCHED], answers[UNBATCHED], rtol=1e-4, atol=1e-5 * max(scale, 1.0)):
        raise AssertionError(f"{part.batched} answers unlike {part.model}: largest difference {largest:g}")
    daemon_pid = spec["daemon_pid"]
    samples = {strategy: {level: Samples() for level in part.levels} for strategy in STRATEGIES}
    keys = (*CPU_KEYS, "calls", "elapsed_s")
    cpu = {strategy: {level: dict.fromkeys(keys, 0.0) for level in part.levels} for strategy in STRATEGIES}
    empty: dict[str, Any] = {"sum": 0.0, "count": 0.0, "wait_sum": 0.0, "wait_count": 0.0}
    batches = {level: {**empty, "buckets": {}} for level in part.levels}

    def window(strategy: str, level: int, seconds: float) -> tuple[list[float], float]:
        model = models[strategy]
        return threaded_window(lambda: model(x), level, seconds, max(1, part.max_calls // level))

    for round_index in range(part.rounds):
        for level in part.levels:
            for strategy in STRATEGIES if round_index % 2 == 0 else STRATEGIES[::-1]:
                window(strategy, level, part.warmup_seconds)
                workers = sorted(descendants_of(daemon_pid))
                before = scrape(spec["metrics_url"], part.batched) if strategy == BATCHED else None
                daemon_cpu, workers_cpu = cpu_seconds([daemon_pid]), cpu_seconds(workers)
                client_cpu, host_cpu = time.process_time(), host_cpu_seconds()
                latencies, elapsed = window(strategy, level, part.window_seconds)
                used = cpu[strategy][level]
                used["client_s"] += time.process_time() - client_cpu
                used["host_s"] += host_cpu_seconds() - host_cpu
                used["elapsed_s"] += elapsed
                used["cores"] = os.cpu_count() or 1
                used["daemon_s"] += cpu_seconds([daemon_pid]) - daemon_cpu
                used["workers_s"] += cpu_seconds(workers) - workers_cpu
                used["calls"] += len(latencies)
                if before is not None:
                    add_up(batches[level], difference(before, scrape(spec["metrics_url"], part.batched)))
                samples[strategy][level].add(latencies, elapsed)
    return {
        "largest_difference": largest,
        "samples": {
            strategy: {str(level): collected.to_json() for level, collected in samples[strategy].items()}
            for strategy in STRATEGIES
        },
        "cpu": {strategy: {str(level): used for level, used in cpu[strategy].items()} for strategy in STRATEGIES},
        "batches": {str(level): stats for level, stats in batches.items()},
    }
