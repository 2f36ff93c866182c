"""The models the benchmarks serve, and how each is packaged with torch.package.

This module is interned into the packages it builds, so it imports nothing but the
standard library and torch: its source travels inside the archive.

- PyLoop: a Python loop of tiny tensor ops. It holds the GIL almost all the time, so
  threads in one interpreter cannot run it in parallel; separate workers can.
- Identity: returns its input; `pid()` says which worker process ran the call.
- LinearStack: big nn.Linear layers, mostly weights, for the memory benchmark.
- Tagged: an Identity that also answers `tag()` with a label fixed at export, so two
  builds answer differently (the hot swap benchmarks tell versions apart by it).
- LazyInit: an Identity whose first call in each process first waits `init_ms`: a lazy init
  (kernels chosen, a cache filled, code compiled on first use), the warmup benchmark's model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

FEATURES = 16


class PyLoop(nn.Module):
    """`iterations` rounds of tanh(x * w + b) on a 1x16 tensor: GIL-bound Python work."""

    def __init__(self, iterations: int) -> None:
        super().__init__()
        self.iterations = iterations
        self.weight = nn.Parameter(torch.full((1, FEATURES), 0.5))
        self.bias = nn.Parameter(torch.full((1, FEATURES), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.iterations):
            x = torch.tanh(x * self.weight + self.bias)
        return x


class Identity(nn.Module):
    """Returns what it was given; pid() names the process that served the call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def pid(self) -> int:
        return os.getpid()


class Tagged(Identity):
    """An Identity whose tag() says which build it is."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def tag(self) -> str:
        return self.label


class LazyInit(Identity):
    """An Identity whose first call in a process waits init_ms (its replicas start cold)."""

    def __init__(self, init_ms: float) -> None:
        super().__init__()
        self.init_ms = init_ms
        self.initialized_in = 0  # the pid that ran the lazy init; a new replica's is another

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.initialized_in != os.getpid():
            time.sleep(self.init_ms / 1000)
            self.initialized_in = os.getpid()
        return x


class LinearStack(nn.Module):
    """layers x nn.Linear(width, width): 4 * width * (width + 1) * layers bytes of float32 weights."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def forward_pid(self, x: torch.Tensor) -> int:
        """Run the model (touching every weight) and name the process that ran it."""
        with torch.no_grad():
            self.layers(x)
        return os.getpid()

    def tag(self) -> str:
        """The label given at export (spec["label"]), "" without one."""
        return str(getattr(self, "label", ""))


def build_model(spec: dict[str, Any]) -> nn.Module:
    kind = spec["kind"]
    if kind == "pyloop":
        return PyLoop(int(spec["iterations"]))
    if kind == "identity":
        return Identity()
    if kind == "tagged":
        return Tagged(str(spec["label"]))
    if kind == "lazy":
        return LazyInit(float(spec["init_ms"]))
    if kind == "big":
        model = LinearStack(int(spec["width"]), int(spec["layers"]))
        if "label" in spec:  # only then, so that the other benchmarks' archives stay as they were
            model.label = str(spec["label"])
        return model
    raise ValueError(f"unknown model kind {kind!r}")


def export(spec: dict[str, Any]) -> dict[str, Any]:
    """Write spec["out"]: a package holding the model at module "model", file "model.pkl"."""
    from torch.package import PackageExporter

    out = Path(spec["out"])
    model = build_model(spec).eval()
    with PackageExporter(str(out)) as exporter:
        exporter.intern("bench.models")
        exporter.save_pickle("model", "model.pkl", model)
    return {"path": str(out), "bytes": out.stat().st_size}
