"""The layers keep to their imports: arrows point down, grpc stays at the edge, torch in workers.

The static check reads every module's imports (also those inside functions); the run-time
check imports a module in a fresh interpreter and looks at what it pulled in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_process import REPO

# What each room of server/ may import from server/ (see server/__init__.py).
_BASE = {"errors", "logs", "malloc", "proto"}
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
_GRPC_ROOMS = {"app", "api", "base"}  # base: proto/ (generated stubs)
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
    found = []
    for path in sorted((REPO / "server").rglob("*.py")):
        relative = path.relative_to(REPO).with_suffix("")
        found.append((".".join(relative.parts), path))
    return found


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_server_rooms_import_only_downward() -> None:
    wrong = []
    for module, path in _modules():
        room = _room(module)
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "server" and name.count(".") >= 1:
                target = _room(name)
                if target not in _ALLOWED[room] and not (name == "server" or name.startswith("server.__")):
                    wrong.append(f"{module} ({room}) imports {name} ({target})")
            if (top == "grpc" or top.startswith("grpc_")) and room not in _GRPC_ROOMS:
                wrong.append(f"{module} ({room}) imports {name}")
            if top == "torch" and room not in _TORCH_ROOMS:
                wrong.append(f"{module} ({room}) imports {name}")
            if top == "aiohttp" and room not in _HTTP_ROOMS:
                wrong.append(f"{module} ({room}) imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_model_api_imports_only_the_standard_library() -> None:
    """deployd_worker is what model code imports (and torch.package externs): it must load
    wherever the model runs, a worker or plain Python, with nothing of deployd's behind it."""
    wrong = []
    for path in sorted((REPO / "deployd_worker").rglob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("deployd_worker", "__future__"):
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_static_check_sees_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from server.api.deployd_v1 import DeploydServicer\n")
    assert "server.api.deployd_v1" in _imports(bad)
    assert "api" not in _ALLOWED[_room("server.pool.supervisor")]


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
    ],
)
def test_module_does_not_import(module: str, forbidden: str) -> None:
    code = f"import sys, {module}; sys.exit(int({forbidden!r} in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{module} imports {forbidden}{result.stderr}"
