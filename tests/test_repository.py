"""The model repository: `models:` in the config, loaded before the daemon serves, reloaded on SIGHUP
or Reload, and a start that stops (exit 2) when a model cannot load."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2

from client import InterpreterManager, NotFoundError, PermissionDeniedError
from tests.conftest import write_config
from tests.daemon_process import REPO, DaemonProcess, wait_until
from tests.test_cli import deployd
from tests.test_operations import check_health

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

TWIN_A = {"name": "twin", "package": "twin_a.pt", "pickle": "twins:twin.pkl"}
TWIN_B = {"name": "twin", "package": "twin_b.pt", "pickle": "twins:twin.pkl"}
SCALE = {"name": "scale", "package": "models.pt", "pickle": "models:scale.pkl"}


def config_with(path: Path, package_dir: Path, models: list[dict[str, str]], **top: Any) -> Path:
    write_config(path, package_dir)
    config = yaml.safe_load(path.read_text())
    config.update(models=models, **top)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def repository_daemon(package_dir: Path, tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(models: list[dict[str, str]], **top: Any) -> DaemonProcess:
        config = config_with(tmp_path / "config.yaml", package_dir, models, **top)
        started.append(DaemonProcess(config).start())
        return started[-1]

    yield start
    for process in started:
        process.assert_clean_stop()


def model_names(manager: InterpreterManager) -> dict[str, tuple[int, str]]:
    return {model.name: (model.serving_version, model.error) for model in manager.status().models}


def test_the_models_of_the_config_serve_by_name_from_the_start(
    repository_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = repository_daemon([TWIN_A, SCALE])
    # Loaded before the daemon listened: the first call finds them.
    with InterpreterManager(daemon.target, timeout=60) as manager:
        assert manager.model("twin")() == "a"
        assert torch.equal(manager.model("scale")(torch.ones(2)), torch.full((2,), 2.0))
        assert model_names(manager) == {"twin": (1, ""), "scale": (1, "")}
    for name in ("", "twin", "scale"):
        assert check_health(daemon.target, name) == SERVING
    assert "loading 2 models" in daemon.log


@pytest.mark.parametrize(
    ("entry", "cause"),
    [
        ({"name": "gone", "package": "no_such.pt", "pickle": "model:model.pkl"}, "no file 'no_such.pt'"),
        ({"name": "badpickle", "package": "twin_a.pt", "pickle": "twins:no_such.pkl"}, "no_such.pkl"),
        ({"name": "notpkg", "package": "not_a_package.pt", "pickle": "m:m.pkl"}, "not a loadable torch.package"),
    ],
    ids=["missing-file", "missing-pickle", "not-a-package"],
)
def test_a_model_that_cannot_load_stops_the_start(
    package_dir: Path, tmp_path: Path, entry: dict[str, str], cause: str
) -> None:
    config = config_with(tmp_path / "config.yaml", package_dir, [TWIN_A, entry])
    result = serve(config)
    assert result.returncode == 2, result.stderr
    assert f"model {entry['name']!r}" in result.stderr and cause in result.stderr, result.stderr


def test_a_duplicate_or_bad_name_is_a_config_error(package_dir: Path, tmp_path: Path) -> None:
    for models, message in (
        ([TWIN_A, TWIN_B], "the name 'twin' is listed twice"),
        ([{**TWIN_A, "name": "bad name"}], "not a valid model name"),
        ([{**TWIN_A, "pickle": "no-colon"}], "pickle must be module:file"),
    ):
        result = serve(config_with(tmp_path / "config.yaml", package_dir, models))
        assert result.returncode == 2 and message in result.stderr, result.stderr


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server", "serve", "--config", str(config), "--address", "127.0.0.1:0"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_models_on_error_continue_serves_the_others(repository_daemon: Callable[..., DaemonProcess]) -> None:
    broken = {"name": "broken", "package": "no_such.pt", "pickle": "model:model.pkl"}
    daemon = repository_daemon([TWIN_A, broken], models_on_error="continue")
    with InterpreterManager(daemon.target, timeout=60) as manager:
        assert manager.model("twin")() == "a"
        names = model_names(manager)
        assert names["broken"][0] == 0 and "no file 'no_such.pt'" in names["broken"][1]
        with pytest.raises(NotFoundError, match="no model 'broken'"):
            manager.model("broken")()
    assert check_health(daemon.target, "broken") == NOT_SERVING
    assert check_health(daemon.target, "") == SERVING


def test_sighup_and_reload_follow_the_config(repository_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    daemon = repository_daemon([TWIN_A, SCALE])
    config = daemon.config_path
    with InterpreterManager(daemon.target, timeout=60) as manager:
        packages_before = {p.package_id for p in manager.status().packages}
        # SIGHUP: twin swaps to another package, scale goes, echo comes.
        echo = {"name": "echo", "package": "models.pt", "pickle": "models:echo.pkl"}
        rewrite_models(config, [TWIN_B, echo])
        daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        assert wait_until(lambda: set(model_names(manager)) == {"twin", "echo"}, 30), model_names(manager)
        assert manager.model("twin")() == "b" and model_names(manager)["twin"][0] == 2
        assert manager.model("echo")("hi") == "hi"
        # twin_a.pt is no longer used by any model: it went with its drained version.
        packages = {p.package_id for p in manager.status().packages}
        assert len(packages) == 2 and packages != packages_before
        # Reload: nothing changed; then a bad entry fails alone and changes nothing.
        report = manager.reload()
        assert sorted(report.unchanged) == ["echo", "twin"] and not report.failed
        broken_conv = {"name": "conv", "package": "conv.pt", "pickle": "model:no_such.pkl"}
        rewrite_models(config, [{**TWIN_B, "pickle": "twins:no_such.pkl"}, echo, broken_conv])
        report = manager.reload()
        assert sorted(failure.name for failure in report.failed) == ["conv", "twin"]
        assert list(report.unchanged) == ["echo"]
        assert manager.model("twin")() == "b" and model_names(manager)["twin"][0] == 2
        assert {p.package_id for p in manager.status().packages} == packages, "the failed load kept its package"
        # A name unloaded by hand comes back with the next reload.
        rewrite_models(config, [TWIN_B, echo])
        manager.model("echo").unload()
        assert list(manager.reload().loaded) == ["echo"] and manager.model("echo")(1) == 1
    result = deployd("reload", "--address", daemon.target)
    assert result.returncode == 0 and "unchanged: twin, echo" in result.stdout, result.stdout
    rewrite_models(config, [{**TWIN_B, "pickle": "twins:no_such.pkl"}, echo])
    result = deployd("reload", "--address", daemon.target)
    assert result.returncode == 1 and "failed: twin:" in result.stdout and "unchanged: echo" in result.stdout
    assert "reload: model 'twin' left as it was" in daemon.log


def rewrite_models(config: Path, models: list[dict[str, str]]) -> None:
    data = yaml.safe_load(config.read_text())
    data["models"] = models
    config.write_text(yaml.safe_dump(data))


def test_reload_needs_an_admin_token(package_dir: Path, tmp_path: Path) -> None:
    config = config_with(tmp_path / "config.yaml", package_dir, [TWIN_A])
    data = yaml.safe_load(config.read_text())
    data["auth"] = {"admin_tokens": ["admin-1f2e3d"], "invoke_tokens": ["invoke-9a8b7c"]}
    config.write_text(yaml.safe_dump(data))
    daemon = DaemonProcess(config).start()
    try:
        with InterpreterManager(daemon.target, timeout=60, token="invoke-9a8b7c") as manager:
            assert manager.model("twin")() == "a"
            with pytest.raises(PermissionDeniedError, match="Reload needs an admin token"):
                manager.reload()
        with InterpreterManager(daemon.target, timeout=60, token="admin-1f2e3d") as manager:
            assert list(manager.reload().unchanged) == ["twin"]
    finally:
        daemon.assert_clean_stop()
