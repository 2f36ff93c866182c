"""The layers keep to their imports: arrows point down, grpc stays at the edge, torch in workers.

Between the top-level packages: the wire format (deployd_wire) imports none of them; the server
and the client import it and never each other; the command line (deployd_cli) is the one place
that imports both. Inside server/, its rooms import only downward.

The static check reads every module's imports from the source files (also those inside
functions, relative ones resolved); the run-time check imports a module in a fresh interpreter
and looks at what it pulled in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_process import REPO

# Which other top-level packages each may import.
_PACKAGES: dict[str, set[str]] = {
    "deployd_wire": set(),
    "deployd_worker": set(),  # model code's API: the standard library only (checked below)
    "server": {"deployd_wire", "deployd_worker"},
    "client": {"deployd_wire"},
    "deployd_cli": {"server", "client", "deployd_wire"},
}

# What each room of server/ may import from server/ (see server/__init__.py).
_BASE = {"errors", "logs", "malloc", "tracing"}
_ALLOWED: dict[str, set[str]] = {
    "app": {"app", "api", "models", "batching", "pool", "ipc", "worker", "base"},
    "api": {"api", "models", "batching", "pool", "ipc", "base"},
    "models": {"models", "batching", "pool", "ipc", "base"},
    "batching": {"batching", "pool", "ipc", "base"},
    "pool": {"pool", "ipc", "worker", "base"},
    "ipc": {"ipc"},
    "worker": {"worker", "ipc"},
    "base": {"ipc", "base"},
}
_GRPC_ROOMS = {"app", "api"}
_TORCH_ROOMS = {"worker"}
_HTTP_ROOMS = {"app", "api"}  # aiohttp: the HTTP edge (server.api.kserve_http)


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in _BASE or parts[1] == "__init__":
        return "base"
    if parts[1] == "__main__":
        return "app"
    return parts[1]


def _modules() -> list[tuple[str, Path]]:
    """(dotted name, path) of every source file of the packages; an __init__.py keeps its name."""
    found = []
    for package in _PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO).with_suffix("")
            found.append((".".join(relative.parts), path))
    return found


def _imports(path: Path, module: str) -> set[str]:
    """Every name path imports, read as module: `from . import x` inside server/api is server.api.x."""
    package = module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
            if node.level == 0:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def violations(module: str, path: Path) -> list[str]:
    """The imports in path (read as module) that break an arrow: one line each."""
    package = module.split(".")[0]
    room = _room(module)
    wrong = []
    for name in sorted(_imports(path, module)):
        top = name.split(".")[0]
        if top in _PACKAGES and top != package and top not in _PACKAGES[package]:
            wrong.append(f"{module} imports {name}: {package} may import {sorted(_PACKAGES[package]) or 'none'}")
        if package != "server":
            continue
        if top == "server" and name.count(".") >= 1:
            target = _room(name)
            if target not in _ALLOWED[room] and not name.startswith("server.__"):
                wrong.append(f"{module} ({room}) imports {name} ({target})")
        if (top == "grpc" or top.startswith("grpc_")) and room not in _GRPC_ROOMS:
            wrong.append(f"{module} ({room}) imports {name}")
        if top == "torch" and room not in _TORCH_ROOMS:
            wrong.append(f"{module} ({room}) imports {name}")
        if top == "aiohttp" and room not in _HTTP_ROOMS:
            wrong.append(f"{module} ({room}) imports {name}")
    return wrong


def test_every_module_imports_only_what_its_layer_may() -> None:
    modules = _modules()
    assert {module.split(".")[0] for module, _ in modules} == set(_PACKAGES)  # the walk found every package
    wrong = [line for module, path in modules for line in violations(module, path)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("module", "source", "wrong"),
    [
        ("server.app.cli", "def main():\n    from client import cli\n", "imports client"),
        ("client._manager", "from server.errors import NotFound\n", "imports server.errors"),
        ("deployd_wire.dtypes", "import deployd_cli.main\n", "imports deployd_cli.main"),
        ("server.pool.supervisor", "def f():\n    from server.api.deployd_v1 import X\n", "(pool) imports server.api"),
        ("server.pool.dispatcher", "from ..api import calls\n", "(pool) imports server.api.calls"),
        ("server.models.service", "import grpc\n", "(models) imports grpc"),
        ("server.api.calls", "import torch\n", "(api) imports torch"),
    ],
    ids=["server->client", "client->server", "wire->cli", "room-up", "relative-room-up", "grpc", "torch"],
)
def test_the_check_fails_on_a_planted_import(tmp_path: Path, module: str, source: str, wrong: str) -> None:
    """The checker the real files go through, on a file with one bad import: it names it."""
    planted = tmp_path / "planted.py"
    planted.write_text(f"import os\nfrom deployd_wire.dtypes import DTYPES\n{source}")
    found = violations(module, planted)
    assert any(wrong in line for line in found), found


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("deployd_cli.main", "import grpc\nfrom client import InterpreterManager\nfrom server.app import cli\n"),
        (
            "server.api.calls",
            "import grpc\nfrom deployd_wire.proto import deployd_pb2\nfrom ..models import x\n",
        ),
        (
            "client._manager",
            "import torch\nfrom deployd_wire.tensors import tensor_bytes\nfrom . import _backend\n",
        ),
    ],
)
def test_the_check_passes_allowed_imports(tmp_path: Path, module: str, source: str) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(source)
    assert violations(module, planted) == []


def test_the_model_api_imports_only_the_standard_library() -> None:
    """deployd_worker is what model code imports (and torch.package externs): it must load
    wherever the model runs, a worker or plain Python, with nothing of deployd's behind it."""
    wrong = []
    for path in sorted((REPO / "deployd_worker").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for name in _imports(path, module):
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("deployd_worker", "__future__"):
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("server.app.daemon", "torch"),  # hundreds of MB the daemon has no use for
        ("server.pool.supervisor", "grpc"),
        ("server.pool.dispatcher", "grpc"),
        ("server.models.service", "grpc"),
        ("server.worker.main", "grpc"),
        ("server.worker.preload", "grpc"),  # the fork server must never have run grpc
        ("server.worker.preload", "aiohttp"),
        ("server.app.worker_process", "aiohttp"),  # a worker's data port speaks gRPC only
        ("server.api.kserve_calls", "aiohttp"),  # the operations know no protocol
        ("server.api.kserve_rest", "aiohttp"),
        ("server.app.daemon", "client"),  # the server never imports the client...
        ("server.app.cli", "client"),
        ("client", "server"),  # ...nor the client the server
        ("client.aio", "server"),
        ("deployd_wire.proto.deployd_pb2", "server"),
        ("deployd_wire.proto.deployd_pb2", "client"),
    ],
)
def test_module_does_not_import(module: str, forbidden: str) -> None:
    code = f"import sys, {module}; sys.exit(int({forbidden!r} in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{module} imports {forbidden}{result.stderr}"
