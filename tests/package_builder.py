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
    import cancellable
    import testmodels

    with PackageExporter(str(out)) as exporter:
        exporter.extern("numpy.**")
        exporter.intern("testmodels")
        # The worker's API (deployd_worker) is extern: the model shares the worker's own copy.
        exporter.extern("deployd_worker")
        exporter.intern("cancellable")
        exporter.save_pickle("models", "patient.pkl", cancellable.Patient())
        exporter.save_pickle("models", "echo.pkl", testmodels.Echo())
        exporter.save_pickle("models", "scale.pkl", testmodels.Scale(2.0))
        exporter.save_pickle("models", "dies_in_new_workers.pkl", testmodels.DiesInNewWorkers())
        exporter.save_pickle("models", "batch_probe.pkl", testmodels.BatchProbe())
        exporter.save_pickle("models", "bad_split.pkl", testmodels.BadSplit())
        exporter.save_pickle("models", "many.pkl", testmodels.EchoMany())
        exporter.save_pickle("models", "complex.pkl", testmodels.Complexify())
        exporter.save_pickle("models", "raises_long.pkl", testmodels.RaisesLong())
        exporter.save_pickle("models", "printer.pkl", testmodels.Printer())
        exporter.save_pickle("models", "slow_start.pkl", testmodels.SlowStart(1.0))
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


# ---------------------------------------------------------------------------------------------
# MultiPy's example packages (multipy/runtime/example/generate_examples.py), for
# tests/test_multipy_ports.py. As there, each package's model is also saved as TorchScript next
# to it (jit_path(out)): the reference its output is compared with.


def jit_path(out: Path) -> Path:
    """Where a multipy_* build saves its TorchScript reference: NAME.pt -> NAME_jit.pt."""
    return out.with_name(out.stem + "_jit.pt")


def _testmodels():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(SOURCES / "models"))
    import testmodels

    return testmodels


def build_multipy_simple(out: Path) -> None:
    """MultiPy's "simple" (scripted reference), plus text and binary resources and a model that prints."""
    testmodels = _testmodels()
    torch.manual_seed(10)
    model = testmodels.Simple(10, 20)
    with PackageExporter(str(out)) as exporter:
        exporter.extern("numpy.**")
        exporter.intern("testmodels")
        exporter.save_pickle("model", "model.pkl", model)
        exporter.save_pickle("model", "example.pkl", (torch.rand(10, 20),))
        exporter.save_text("extra_files", "greeting", "hello from a package ✓")
        exporter.save_binary("extra_files", "blob", bytes(range(256)) + b"\x00\xff")
        exporter.save_pickle("print", "model.pkl", testmodels.Prints())
    torch.jit.script(model).save(str(jit_path(out)))


def build_multipy_resnet(out: Path) -> None:
    """A ResNet-18 built from torch.nn (no torchvision), in eval mode; traced reference."""
    testmodels = _testmodels()
    torch.manual_seed(11)
    model = testmodels.ResNet18().eval()
    example = torch.rand(1, 3, 64, 64)
    with PackageExporter(str(out)) as exporter:
        exporter.extern("numpy.**")
        exporter.intern("testmodels")
        exporter.save_pickle("model", "model.pkl", model)
        exporter.save_pickle("model", "example.pkl", (example,))
    with torch.no_grad():
        # check_trace=False: trace's own re-run check costs seconds; the test compares outputs anyway
        torch.jit.trace(model, (example,), check_trace=False).save(str(jit_path(out)))


def build_multipy_simple_leaf_fx(out: Path) -> None:
    """An FX GraphModule of SimpleWithLeaf (its wrapped leaf kept as a call); scripted reference."""
    testmodels = _testmodels()
    torch.manual_seed(12)
    model = testmodels.SimpleWithLeaf(5, 10)
    graph_module = torch.fx.symbolic_trace(model)
    with PackageExporter(str(out)) as exporter:
        exporter.extern("numpy.**")
        exporter.intern("testmodels")
        exporter.save_pickle("model", "model.pkl", graph_module)
    torch.jit.script(model).save(str(jit_path(out)))


USES_DISTRIBUTED = """\
import torch.distributed as dist

assert dist.is_available()
INITIALIZED = dist.is_initialized()
GLOO = str(dist.Backend("gloo"))
SUM = str(dist.ReduceOp.SUM)


def store_round_trip(key, value):
    \"\"\"A HashStore: torch.distributed's in-process key-value store, no process group needed.\"\"\"
    store = dist.HashStore()
    store.set(key, value)
    return store.get(key)
"""


def build_multipy_uses_distributed(out: Path) -> None:
    """MultiPy's "uses_distributed": a package whose one module imports torch.distributed."""
    with PackageExporter(str(out)) as exporter:
        exporter.save_source_string("uses_distributed", USES_DISTRIBUTED)


MULTIPY_BUILDS = {
    "multipy_simple": build_multipy_simple,
    "multipy_resnet": build_multipy_resnet,
    "multipy_simple_leaf_fx": build_multipy_simple_leaf_fx,
    "multipy_uses_distributed": build_multipy_uses_distributed,
}


def build_multipy_all(directory: Path) -> None:
    """Every multipy_* package into directory (NAME.pt, NAME_jit.pt): one process, torch imported once."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, build in MULTIPY_BUILDS.items():
        build(directory / f"{name}.pt")


MULTIPY_BUILDS_IN_ONE = {"multipy": build_multipy_all}


BUILDS = {
    "conv": build_conv,
    "models": build_models,
    "twin_a": lambda out: build_twin("a", out),
    "twin_b": lambda out: build_twin("b", out),
    "uses_extra": build_uses_extra,
    "big": build_big,
    "churn": build_churn,
}

BUILDS.update(MULTIPY_BUILDS)
BUILDS.update(MULTIPY_BUILDS_IN_ONE)

if __name__ == "__main__":
    name, out = sys.argv[1:]
    BUILDS[name](Path(out))
