"""Batching: what dynamic batching (server.batching) buys, side by side with the same model unbatched,
through the daemon and on the direct path.

Two real daemons (2 workers each, `pool.workers: 2`, metrics on 127.0.0.1 port 0) serve each
model twice by name from their config's `models:`, from the same package: once plain, once with
`batching:` on. One has no data ports: every call goes through it to a free worker, the daemon's
one batcher joining the calls of all callers (the daemon path, strategies "unbatched" and
"batched"). The other has `pool.data_ports: 0`: the client sends each call straight to the worker
with the fewest calls in flight, and each worker runs the batcher over its own calls, so the
calls that reach a worker while it runs one make its next batch (the direct path,
"direct-unbatched" and "direct-batched"). The same client code calls all four,
`manager.model(name)(x)` from N threads on one InterpreterManager per daemon (as bench.v2load
drives deployd.v1; `direct=False` for the first, `direct=True` for the second), in interleaved
rounds (the order of the four turns every round), every window after an uncounted warm-up window:

- seed (scripts/export_seed.py: two convolutions), input 1x1x10x10 float32 a call, batching
  {max_batch_size: 32, max_queue_delay_ms: 2}, at 1, 8 and 32 callers;
- resnet18: a ResNet-18 built here from torch.nn (BasicBlocks, 64/128/256/512 channels,
  [2, 2, 2, 2]; random weights, eval mode), input 1x3x224x224 float32 a call, batching
  {max_batch_size: 16, max_queue_delay_ms: 2}, at 8 and 32 callers (--smoke: 64x64).

Printed per model and level, for each path: calls/s, p50 and p99 of both, batched / unbatched
for calls/s and p50 (the median over rounds of the ratio within a round); on the direct path
also direct batched / daemon-path batched and direct unbatched / daemon-path unbatched calls/s;
for the batched windows the mean batch size and how the batch sizes spread (deltas of that
daemon's `deployd_batch_size` histogram around each measured window: on the direct path the
workers' batches, merged into the daemon's /metrics) and the mean time a call waited in the
batcher (`deployd_batch_queue_delay_seconds`); and CPU time per call of the daemon, its
workers, the load generator and the whole host (/proc/stat: every process and the kernel), and
how busy the cores were, over all measured windows. Target: seed at 32 callers, daemon path,
batched / unbatched calls/s >= 3x (the direct path's ratios are reported, no target). One
caller (seed): p50 batched / unbatched on each path, the batcher's cost without load (by design
a lone call is not delayed; no target). Before the load, one call of each batched model, on
each path, must answer what the unbatched one does through the daemon (within float
tolerance: a batch may take another convolution algorithm), and the direct client must have
reached the workers' data ports.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import types
import urllib.request
from contextlib import ExitStack
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
    start_daemons,
    threaded_window,
    wait_until,
)
from bench.v2load import cpu_seconds, export_seed, spread
from server.pool.procinfo import descendants_of

UNBATCHED = "unbatched"  # the daemon path
BATCHED = "batched"
DIRECT_UNBATCHED = "direct-unbatched"  # the direct path: the workers' data ports
DIRECT_BATCHED = "direct-batched"
DAEMON_PATH = (UNBATCHED, BATCHED)
DIRECT_PATH = (DIRECT_UNBATCHED, DIRECT_BATCHED)
STRATEGIES = (*DAEMON_PATH, *DIRECT_PATH)
WITH_BATCHING = (BATCHED, DIRECT_BATCHED)
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
        return self.batched if strategy in WITH_BATCHING else self.model

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
    """The daemon with metrics on, serving every part's model twice by name: plain and batched;
    with data_ports, every worker also serves calls on a port of its own (`pool.data_ports: 0`)."""

    def __init__(self, workdir: Path, packages: dict[str, Path], parts: list[Part], data_ports: bool = False) -> None:
        super().__init__(workdir, WORKERS)
        self.packages = packages
        self.parts = parts
        self.data_ports = data_ports
        self.label = f"{self.label}{' and data ports' if data_ports else ''}, batched and unbatched models by name"
        self.metrics_url = ""

    def write_config(self) -> Path:
        path = super().write_config()
        for file_name, package in self.packages.items():
            shutil.copyfile(package, path.parent / "packages" / file_name)
        config = yaml.safe_load(path.read_text())
        config["metrics"] = {"address": "127.0.0.1:0"}
        if self.data_ports:
            config["pool"]["data_ports"] = 0
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
    packages = {"seed.pt": seed, "resnet18.pt": resnet}
    with ExitStack() as stack:
        # Both at once (they boot in parallel); the direct path's daemon idles while the daemon
        # path is measured and the other way round.
        daemon = BatchingDaemon(ctx.workdir, packages, parts)
        direct = BatchingDaemon(ctx.workdir, packages, parts, data_ports=True)
        start_daemons(stack, [daemon, direct])
        spec = {
            "target": daemon.target,
            "daemon_pid": daemon.pid,
            "metrics_url": daemon.find_metrics_url(),
            "direct_target": direct.target,
            "direct_daemon_pid": direct.pid,
            "direct_metrics_url": direct.find_metrics_url(),
            "parts": [asdict(part) for part in parts],
        }
        windows = sum(part.rounds * len(part.levels) * len(STRATEGIES) for part in parts)
        window = max(part.window_seconds + part.warmup_seconds for part in parts)
        result = run_in_child("bench.batching:side_by_side_load", spec, 300 + windows * (window + 30))
    for part in parts:
        report(ctx, part, result[part.model])


def report(ctx: Context, part: Part, result: dict[str, Any]) -> None:
    ctx.report.line(
        f"batching: {part.model}, {part.shape_text} float32 a call, batched as {part.batched}"
        f" (max_batch_size {part.max_batch_size}, max_queue_delay_ms {part.max_queue_delay_ms:g}):"
        f" one call answers as unbatched within {result['largest_difference']:.2g};"
        f" on the direct path (both names) within {result['direct_largest_difference']:.2g}"
    )
    for level in part.levels:
        report_level(ctx, part, result, level)


def report_level(ctx: Context, part: Part, result: dict[str, Any], level: int) -> None:
    """One model at one level: rows for the four strategies, the ratios of each path and between them."""
    samples = {strategy: Samples.from_json(result["samples"][strategy][str(level)]) for strategy in STRATEGIES}
    rows = {
        strategy: ctx.report.add(samples[strategy].row(f"batching_{part.model}", strategy, level))
        for strategy in STRATEGIES
    }
    rates = {strategy: samples[strategy].rates() for strategy in STRATEGIES}
    p50s = {strategy: samples[strategy].p50s() for strategy in STRATEGIES}

    def figures(strategies: tuple[str, ...]) -> str:
        return "; ".join(
            f"{strategy} {rows[strategy].work_items_per_second:.1f}/s, p50 {rows[strategy].p50_latency:.3f} ms,"
            f" p99 {percentile(samples[strategy].latencies, 99) * 1000:.3f} ms"
            for strategy in strategies
        )

    where = f"batching: {part.model}, {'1 caller' if level == 1 else f'{level} callers'}"
    batched_rates = paired_ratios(rates[BATCHED], rates[UNBATCHED])
    batched_p50s = paired_ratios(p50s[BATCHED], p50s[UNBATCHED])
    ratios = f"batched/unbatched calls/s {spread(batched_rates)}, p50 {spread(batched_p50s)}"
    ctx.report.line(f"{where}: {figures(DAEMON_PATH)}; {ratios}")
    ctx.report.line(f"{where}, batched: {batch_text(result['batches'][BATCHED][str(level)])}")
    ctx.report.line(f"{where}, CPU per call: {cpu_text(result['cpu'], level, DAEMON_PATH)}")
    direct_rates = paired_ratios(rates[DIRECT_BATCHED], rates[DIRECT_UNBATCHED])
    direct_p50s = paired_ratios(p50s[DIRECT_BATCHED], p50s[DIRECT_UNBATCHED])
    ctx.report.line(
        f"{where}, direct path: {figures(DIRECT_PATH)};"
        f" direct batched/unbatched calls/s {spread(direct_rates)}, p50 {spread(direct_p50s)};"
        f" direct/daemon path calls/s, batched {spread(paired_ratios(rates[DIRECT_BATCHED], rates[BATCHED]))},"
        f" unbatched {spread(paired_ratios(rates[DIRECT_UNBATCHED], rates[UNBATCHED]))}"
    )
    ctx.report.line(f"{where}, direct-batched: {batch_text(result['batches'][DIRECT_BATCHED][str(level)])}")
    ctx.report.line(f"{where}, direct path, CPU per call: {cpu_text(result['cpu'], level, DIRECT_PATH)}")
    if part.model == "seed" and level == TARGET_LEVEL:
        ctx.report.check(f"{where}, batched/unbatched calls/s", batched_rates, ">=", TARGET_RATIO)
    if part.model == "seed" and level == 1:
        ctx.report.line(
            f"{where} (no load): p50 batched {rows[BATCHED].p50_latency:.3f} ms /"
            f" unbatched {rows[UNBATCHED].p50_latency:.3f} ms = {spread(batched_p50s)}; direct path"
            f" {rows[DIRECT_BATCHED].p50_latency:.3f} / {rows[DIRECT_UNBATCHED].p50_latency:.3f} ms ="
            f" {spread(direct_p50s)} (the batcher's cost without load; by design a lone call is not delayed;"
            " no target)"
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


def cpu_text(cpu: dict[str, Any], level: int, strategies: tuple[str, ...]) -> str:
    """CPU time per call of the daemon, its workers, the load generator and the whole host (all
    processes, the kernel's too), and how busy the host's cores were in the measured windows."""
    parts = []
    for strategy in strategies:
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
    """Every part: its two names on both paths, in interleaved rounds at each level. Returns
    Samples as JSON and stats."""
    from client import InterpreterManager

    with (
        InterpreterManager(spec["target"], timeout=120, direct=False) as daemon_path,
        InterpreterManager(spec["direct_target"], timeout=120, direct=True) as direct_path,
    ):
        managers = {strategy: direct_path if strategy in DIRECT_PATH else daemon_path for strategy in STRATEGIES}
        return {part["model"]: load_part(managers, spec, Part(**part)) for part in spec["parts"]}


def path_of(spec: dict[str, Any], strategy: str) -> tuple[int, str]:
    """The daemon's pid and its metrics address, for the daemon a strategy's calls go to."""
    if strategy in DIRECT_PATH:
        return spec["direct_daemon_pid"], spec["direct_metrics_url"]
    return spec["daemon_pid"], spec["metrics_url"]


def load_part(managers: dict[str, Any], spec: dict[str, Any], part: Part) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(part.shape, generator=generator)
    models = {strategy: managers[strategy].model(part.name_of(strategy)) for strategy in STRATEGIES}
    answers = {strategy: models[strategy](x) for strategy in STRATEGIES}
    expected = answers[UNBATCHED]
    scale = float(expected.abs().max())
    largest = {strategy: float((answers[strategy] - expected).abs().max()) for strategy in STRATEGIES}
    for strategy in STRATEGIES:
        if not torch.allclose(answers[strategy], expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0)):
            raise AssertionError(
                f"{strategy} {part.name_of(strategy)} answers unlike {part.model} through the daemon:"
                f" largest difference {largest[strategy]:g}"
            )
    routes = managers[DIRECT_BATCHED]._routes  # the client's own record (client._direct.Routes)
    if not (routes.enabled and routes.reached and routes.workers):
        raise BenchError("the direct path's client did not reach the workers' data ports")
    samples = {strategy: {level: Samples() for level in part.levels} for strategy in STRATEGIES}
    keys = (*CPU_KEYS, "calls", "elapsed_s")
    cpu = {strategy: {level: dict.fromkeys(keys, 0.0) for level in part.levels} for strategy in STRATEGIES}
    empty: dict[str, Any] = {"sum": 0.0, "count": 0.0, "wait_sum": 0.0, "wait_count": 0.0}
    batches = {strategy: {level: {**empty, "buckets": {}} for level in part.levels} for strategy in WITH_BATCHING}

    def window(strategy: str, level: int, seconds: float) -> tuple[list[float], float]:
        model = models[strategy]
        return threaded_window(lambda: model(x), level, seconds, max(1, part.max_calls // level))

    for round_index in range(part.rounds):
        turn = round_index % len(STRATEGIES)
        for level in part.levels:
            for strategy in STRATEGIES[turn:] + STRATEGIES[:turn]:
                daemon_pid, metrics_url = path_of(spec, strategy)
                window(strategy, level, part.warmup_seconds)
                workers = sorted(descendants_of(daemon_pid))
                before = scrape(metrics_url, part.batched) if strategy in WITH_BATCHING else None
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
                    add_up(batches[strategy][level], difference(before, scrape(metrics_url, part.batched)))
                samples[strategy][level].add(latencies, elapsed)
    return {
        "largest_difference": largest[BATCHED],
        "direct_largest_difference": max(largest[strategy] for strategy in DIRECT_PATH),
        "samples": {
            strategy: {str(level): collected.to_json() for level, collected in samples[strategy].items()}
            for strategy in STRATEGIES
        },
        "cpu": {strategy: {str(level): used for level, used in cpu[strategy].items()} for strategy in STRATEGIES},
        "batches": {
            strategy: {str(level): stats for level, stats in batches[strategy].items()} for strategy in WITH_BATCHING
        },
    }
