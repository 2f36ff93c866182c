"""Build one test package: python tests/package_builder.py NAME OUT.pt

Each package is built in its own process, so two packages can hold different modules
of the same name.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.package import PackageExporter

SOURCES = Path(__file__).parent / "package_sources"


def conv_model() -> nn.Module:
    """The seed example of torch::deploy."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.Conv2d(20, 64, 5), nn.ReLU())


def build_conv(out: Path) -> None:
    with PackageExporter(str(out)) as exporter:
        exporter.extern("numpy.**")
        exporter.save_pickle("model", "model.pkl", conv_model())


def build_models(out: Path) -> None:
    sys.path.insert(0, str(SOURCES / "models"))
    import testmodels

    with PackageExporter(str(out)) as exporter:
        exporter.extern("numpy.**")
        exporter.intern("testmodels")
        exporter.save_pickle("models", "echo.pkl", testmodels.Echo())
        exporter.save_pickle("models", "scale.pkl", testmodels.Scale(2.0))
        exporter.save_pickle("models", "dies_in_new_workers.pkl", testmodels.DiesInNewWorkers())
        exporter.save_pickle("models", "batch_probe.pkl", testmodels.BatchProbe())
        exporter.save_pickle("models", "bad_split.pkl", testmodels.BadSplit())
        exporter.save_pickle("models", "many.pkl", testmodels.EchoMany())
        exporter.save_pickle("models", "complex.pkl", testmodels.Complexify())
        exporter.save_text("models", "notes.txt", "weights: scale 2.0 ✓")
        exporter.save_binary("models", "blob.bin", bytes(range(256)))


def build_twin(variant: str, out: Path) -> None:
    sys.path.insert(0, str(SOURCES / f"same_name_{variant}"))
    import twin

    with PackageExporter(str(out)) as exporter:
        exporter.intern("twin")
        exporter.save_pickle("twins", "twin.pkl", twin.Twin())


def build_uses_extra(out: Path) -> None:
    sys.path.insert(0, str(SOURCES / "extras"))
    import uses_extra

    with PackageExporter(str(out)) as exporter:
        exporter.extern("deployd_extra_helper")
        exporter.intern("uses_extra")
        exporter.save_pickle("extra", "model.pkl", uses_extra.UsesExtra())


def build_big(out: Path) -> None:
    """About 6 MB of weights: more than gRPC's default 4 MB message."""
    torch.manual_seed(1)
    with PackageExporter(str(out)) as exporter:
        exporter.save_pickle("big", "model.pkl", nn.Linear(1200, 1200))


def build_churn(out: Path) -> None:
    """16 MB of weights, loaded and unloaded over and over (test_churn)."""
    torch.manual_seed(2)
    with PackageExporter(str(out)) as exporter:
        exporter.save_pickle("churn", "model.pkl", nn.Linear(2048, 2048))


BUILDS = {
    "conv": build_conv,
    "models": build_models,
    "twin_a": lambda out: build_twin("a", out),
    "twin_b": lambda out: build_twin("b", out),
    "uses_extra": build_uses_extra,
    "big": build_big,
    "churn": build_churn,
}

if __name__ == "__main__":
    name, out = sys.argv[1:]
    BUILDS[name](Path(out))
