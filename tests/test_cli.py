"""The operator commands (`deployd status|load|unload|invoke|health`), run as the real CLI
in a subprocess against the real daemon; exit codes as deployd_cli/commands.py documents them."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.package import PackageExporter

from client import InterpreterManager, NotFoundError, ReplicatedObj
from deployd_cli import commands
from deployd_cli.main import build_parser
from deployd_cli.status_view import status_text
from server.app.exit_codes import ExitCode, WorkerExitCode
from tests.daemon_process import REPO, DaemonProcess


def deployd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("DEPLOYD_ADDRESS", "DEPLOYD_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", "deployd_cli", *args],
        cwd=REPO,
        env={**environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )


def unload_objects(target: str, object_ids: list[str]) -> None:
    with InterpreterManager(target, timeout=60) as manager:
        for object_id in object_ids:
            with contextlib.suppress(NotFoundError):  # the test unloaded it itself
                ReplicatedObj(manager, object_id).unload()


@pytest.fixture(scope="module")
def objects(daemon: DaemonProcess, package_dir: Path) -> Iterator[dict[str, str]]:
    """Scale and Echo, loaded with `deployd load` (human output: one id a line)."""
    result = deployd(
        "load", str(package_dir / "models.pt"), "--pickle", "models:scale.pkl", "--pickle", "models:echo.pkl",
        "--address", daemon.target,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    package_id, scale_id, echo_id = result.stdout.split()
    try:
        yield {"package": package_id, "scale": scale_id, "echo": echo_id}
    finally:
        unload_objects(daemon.target, [scale_id, echo_id])  # the package stays: other tests share it


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def invoke_json(target: str, *args: str) -> object:
    result = deployd("invoke", "--address", target, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_human_and_json(daemon: DaemonProcess, objects: dict[str, str]) -> None:
    human = deployd("status", "--address", daemon.target)
    assert human.returncode == 0, human.stderr
    assert human.stdout.startswith("WORKER")
    assert "queued calls: " in human.stdout
    assert objects["scale"] in human.stdout

    machine = deployd("status", "--json", env={"DEPLOYD_ADDRESS": daemon.target})  # the default address
    assert machine.returncode == 0, machine.stderr
    status = json.loads(machine.stdout)
    assert len(status["workers"]) == 2
    assert set(status["workers"][0]) >= {"index", "pid", "state", "calls", "restarts", "rss_bytes", "private_bytes"}
    assert isinstance(status["queued_calls"], int)
    assert {
        "object_id": objects["scale"],
        "package_id": objects["package"],
        "module": "models",
        "file": "scale.pkl",
    } in (status["objects"])
    assert objects["package"] in [package["package_id"] for package in status["packages"]]


def test_invoke_with_tensor_json_and_kwargs(daemon: DaemonProcess, objects: dict[str, str]) -> None:
    target, scale, echo = daemon.target, objects["scale"], objects["echo"]
    doubled = {"tensor": {"dtype": "float32", "shape": [2, 2], "values": [[2.0, 4.0], [6.0, 8.0]]}}
    assert invoke_json(target, scale, "tensor:[[1,2],[3,4]]") == doubled
    shifted = invoke_json(target, scale, "tensor:[1,2]", "--kwarg", "offset=1", "--kwarg", "negate=true")
    assert shifted == {"tensor": {"dtype": "float32", "shape": [2], "values": [-3.0, -5.0]}}
    assert invoke_json(target, scale, "--method", "describe", '"x"', "--kwarg", 'suffix="?"') == "x2.0?"
    assert invoke_json(target, scale, "ones:1,3") == {
        "tensor": {"dtype": "float32", "shape": [1, 3], "values": [[2.0] * 3]}
    }
    assert invoke_json(target, echo, "tensor:int64:[7,8]")["tensor"] == {
        "dtype": "int64",
        "shape": [2],
        "values": [7, 8],
    }  # type: ignore[index]
    assert invoke_json(target, echo, '{"a": [1, 2.5, null, true, "s"]}') == {"a": [1, 2.5, None, True, "s"]}
    assert invoke_json(target, echo, "--method", "pair", "1", "2") == [[1, 2], {}]  # a tuple prints as a list


def test_invoke_truncates_large_tensors_unless_full(daemon: DaemonProcess, objects: dict[str, str]) -> None:
    short = invoke_json(daemon.target, objects["echo"], "zeros:2,1000")["tensor"]  # type: ignore[index]
    assert short["shape"] == [2, 1000] and len(short["values"]) == 1000 and "truncated" in short
    full = invoke_json(daemon.target, objects["echo"], "zeros:2,1000", "--full")["tensor"]  # type: ignore[index]
    assert len(full["values"]) == 2 and len(full["values"][1]) == 1000 and "truncated" not in full


def test_invoke_unknown_object_exits_1(daemon: DaemonProcess) -> None:
    result = deployd("invoke", "obj-missing", "1", "--address", daemon.target)
    assert result.returncode == 1
    assert result.stderr.startswith("deployd: NOT_FOUND: no object 'obj-missing' is loaded"), result.stderr
    assert result.stdout == ""


def test_unloaded_object_cannot_be_invoked(daemon: DaemonProcess, package_dir: Path) -> None:
    loaded = deployd(
        "load", str(package_dir / "models.pt"), "--pickle", "models:echo.pkl", "--json", "--address", daemon.target
    )
    assert loaded.returncode == 0, loaded.stderr
    echo = json.loads(loaded.stdout)["objects"][0]
    assert echo["module"] == "models" and echo["file"] == "echo.pkl"
    try:
        assert invoke_json(daemon.target, echo["object_id"], '"hi"') == "hi"
        unloaded = deployd("unload", "--object", echo["object_id"], "--address", daemon.target)
        assert (unloaded.returncode, unloaded.stdout) == (0, f"unloaded object {echo['object_id']}\n")
        result = deployd("invoke", echo["object_id"], '"hi"', "--address", daemon.target)
        assert result.returncode == 1
        assert result.stderr.startswith("deployd: NOT_FOUND: "), result.stderr
    finally:
        unload_objects(daemon.target, [echo["object_id"]])


def test_unload_package_takes_its_objects(daemon: DaemonProcess, tmp_path: Path) -> None:
    path = tmp_path / "own.pt"
    with PackageExporter(str(path)) as exporter:  # bytes no other test loads: unloading it hurts none
        exporter.save_pickle("data", "data.pkl", {"unique": uuid.uuid4().hex})
    loaded = deployd("load", str(path), "--pickle", "data:data.pkl", "--json", "--address", daemon.target)
    assert loaded.returncode == 0, loaded.stderr
    report = json.loads(loaded.stdout)
    object_id = report["objects"][0]["object_id"]
    try:
        unloaded = deployd("unload", "--package", report["package_id"], "--json", "--address", daemon.target)
        assert unloaded.returncode == 0, unloaded.stderr
        assert json.loads(unloaded.stdout) == {"package_id": report["package_id"], "object_ids": [object_id]}
        again = deployd("unload", "--package", report["package_id"], "--address", daemon.target)
        assert again.returncode == 1 and again.stderr.startswith("deployd: NOT_FOUND: "), again.stderr
    finally:
        unload_objects(daemon.target, [object_id])


def test_health(daemon: DaemonProcess) -> None:
    result = deployd("health", "--address", daemon.target)
    assert (result.returncode, result.stdout) == (0, "SERVING\n"), result.stderr
    named = deployd("health", "--service", "deployd.v1.Deployd", "--json", "--address", daemon.target)
    assert named.returncode == 0, named.stderr
    assert json.loads(named.stdout) == {"service": "deployd.v1.Deployd", "status": "SERVING"}
    unknown = deployd("health", "--service", "no.such.Service", "--address", daemon.target)
    assert (unknown.returncode, unknown.stdout) == (4, "SERVICE_UNKNOWN\n"), unknown.stderr


def test_unreachable_daemon_exits_3() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    for command in ("status", "health"):
        result = deployd(command, "--address", address, "--timeout", "5")
        assert result.returncode == 3, (command, result.stderr)
        assert result.stderr.startswith("deployd: UNAVAILABLE: ") and address in result.stderr, result.stderr


MALFORMED_ARGS = [
    ["tensor:[1,"],  # not JSON
    ["tensor:[[1,2],[3]]"],  # ragged
    ["ones:2,x"],
    ["rand:int64:2"],  # rand makes floats only
    ["hello"],  # a string needs its JSON quotes
    ["9223372036854775808"],  # over int64
    ["1", "--kwarg", "offset"],  # no =
    ["1", "--bogus"],  # not an option of invoke
    ["1", "--version", "-1"],  # versions count from 1 (0: the serving one)
]


def test_malformed_arg_exits_2(daemon: DaemonProcess) -> None:
    environ = {k: v for k, v in os.environ.items() if k not in ("DEPLOYD_ADDRESS", "DEPLOYD_TOKEN")}
    runs = [  # side by side: each is a process start and nothing else
        subprocess.Popen(
            [sys.executable, "-m", "deployd_cli", "invoke", "obj-whatever", *args, "--address", daemon.target],
            cwd=REPO,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in MALFORMED_ARGS
    ]
    results = [run.communicate(timeout=90) for run in runs]
    for args, run, (stdout, stderr) in zip(MALFORMED_ARGS, runs, results, strict=True):
        assert (run.returncode, stdout) == (2, ""), (args, stderr)
        assert stderr.startswith(("deployd: ", "usage: deployd")), (args, stderr)


def test_bad_local_input_for_load_exits_2(daemon: DaemonProcess, tmp_path: Path, package_dir: Path) -> None:
    missing = deployd("load", str(tmp_path / "missing.pt"), "--address", daemon.target)
    assert missing.returncode == 2
    assert "cannot read package file" in missing.stderr and "missing.pt" in missing.stderr
    bad_pickle = deployd("load", str(package_dir / "models.pt"), "--pickle", "scale.pkl", "--address", daemon.target)
    assert bad_pickle.returncode == 2 and "MODULE:FILE" in bad_pickle.stderr
    usage = deployd("unload", "--address", daemon.target)  # needs a TARGET, --model, --object or --package
    assert usage.returncode == 2
    both = deployd("unload", "some-model", "--object", "obj-0123456789abcdef", "--address", daemon.target)
    assert both.returncode == 2 and "one TARGET" in both.stderr, both.stderr
    two_for_one_name = deployd(
        "load", str(package_dir / "models.pt"), "--pickle", "models:scale.pkl", "--pickle", "models:echo.pkl",
        "--name", "cli-two", "--address", daemon.target,
    )  # fmt: skip
    assert two_for_one_name.returncode == 2 and "exactly one --pickle" in two_for_one_name.stderr
    unnamed = deployd(
        "load", str(package_dir / "models.pt"), "--pickle", "models:batch_probe.pkl", "--batching", "8",
        "--address", daemon.target,
    )  # fmt: skip
    assert unnamed.returncode == 2 and "--batching is for a model with a name" in unnamed.stderr
    bad_batching = deployd(
        "load", str(package_dir / "models.pt"), "--pickle", "models:batch_probe.pkl", "--name", "cli-batched",
        "--batching", "lots", "--address", daemon.target,
    )  # fmt: skip
    assert bad_batching.returncode == 2 and "ROWS[:DELAY_MS]" in bad_batching.stderr


def test_load_with_batching(daemon: DaemonProcess, package_dir: Path) -> None:
    try:
        loaded = deployd(
            "load", str(package_dir / "models.pt"), "--pickle", "models:batch_probe.pkl", "--name", "cli-batched",
            "--batching", "8:1.5", "--address", daemon.target,
        )  # fmt: skip
        assert loaded.returncode == 0, loaded.stderr
        with InterpreterManager(daemon.target, timeout=60) as manager:
            y, rows = manager.model("cli-batched")(torch.ones(2, 3))
        assert torch.equal(y, torch.full((2, 3), 2.0)) and rows.tolist() == [2, 2]
        status = deployd("status", "--json", "--address", daemon.target)
        (model,) = [model for model in json.loads(status.stdout)["models"] if model["name"] == "cli-batched"]
        assert model["versions"][0]["batching"] == {
            "max_batch_size": 8,
            "max_queue_delay_ms": 1.5,
            "preferred_batch_sizes": [],
        }
        text = deployd("status", "--address", daemon.target).stdout
        assert "version 1 batches calls: up to 8 rows, first call waits up to 1.5 ms" in text, text
    finally:
        unload_model(daemon.target, "cli-batched")


@pytest.mark.parametrize("entry", ["deployd_cli.main", "server.app.cli"])  # `deployd`, `python -m server`
def test_serve_loads_neither_client_nor_torch(entry: str) -> None:
    code = (
        f"import sys; from {entry} import main; code = main(['serve', '--config', '/nonexistent/deployd.yaml']);"
        " sys.exit(10 + code if 'client' in sys.modules or 'torch' in sys.modules else code)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr  # with no client imported


def test_python_m_server_serves_and_points_to_deployd_for_the_rest() -> None:
    """`python -m server` is the daemon alone: it knows `serve`, and names deployd for the rest."""
    result = subprocess.run(
        [sys.executable, "-m", "server", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout and "python -m deployd_cli" in result.stdout


def unload_model(target: str, name: str) -> None:
    with InterpreterManager(target, timeout=60) as manager, contextlib.suppress(NotFoundError):
        manager.model(name).unload()


def test_load_by_name_serves_versions_that_invoke_and_status_show(daemon: DaemonProcess, package_dir: Path) -> None:
    target, name = daemon.target, "cli-twin"
    try:
        first = deployd(
            "load", str(package_dir / "twin_a.pt"), "--pickle", "twins:twin.pkl", "--name", name, "--json",
            "--address", target,
        )  # fmt: skip
        assert first.returncode == 0, first.stderr
        (loaded,) = json.loads(first.stdout)["objects"]
        assert loaded["object_id"].startswith("obj-")
        assert (loaded["name"], loaded["version"], loaded["module"], loaded["file"]) == (name, 1, "twins", "twin.pkl")
        assert invoke_json(target, name) == "a"

        second = deployd(
            "load", str(package_dir / "twin_b.pt"), "--pickle", "twins:twin.pkl", "--name", name, "--address", target
        )
        assert second.returncode == 0, second.stderr
        package_id, object_id, named, version_word, version = second.stdout.split()
        assert (named, version_word, version) == (name, "version", "2") and object_id.startswith("obj-")

        assert invoke_json(target, name) == "b", "the name serves its new version at once"
        assert invoke_json(target, name, "--version", "2") == "b"
        assert invoke_json(target, "--version", "0", name) == "b"  # 0: the serving one
        gone = deployd("invoke", name, "--version", "1", "--address", target)
        assert gone.returncode == 1 and "no version 1" in gone.stderr, gone.stderr
        pinned_id = deployd("invoke", object_id, "--version", "2", "--address", target)
        assert pinned_id.returncode == 1 and pinned_id.stderr.startswith("deployd: INVALID_ARGUMENT: ")

        machine = deployd("status", "--json", "--address", target)
        assert machine.returncode == 0, machine.stderr
        (model,) = [model for model in json.loads(machine.stdout)["models"] if model["name"] == name]
        assert model == {
            "name": name,
            "serving_version": 2,
            "versions": [
                {
                    "version": 2,
                    "state": "serving",
                    "object_id": object_id,
                    "calls_in_flight": 0,
                    "package_id": package_id,
                    "module": "twins",
                    "file": "twin.pkl",
                }
            ],
        }
        human = deployd("status", "--address", target)
        assert human.returncode == 0, human.stderr
        lines = human.stdout.splitlines()
        at = lines.index(f"  {name}  serving version 2")
        assert lines[at + 1].split() == ["VERSION", "STATE", "OBJECT", "CALLS", "MODULE:FILE", "PACKAGE"]
        assert lines[at + 2].split() == ["2", "serving", object_id, "0", "twins:twin.pkl", package_id]

        unloaded = deployd("unload", name, "--address", target)  # neither a package id nor an object id
        assert (unloaded.returncode, unloaded.stdout) == (0, f"unloaded model {name}\n"), unloaded.stderr
        result = deployd("invoke", name, "--address", target)
        assert result.returncode == 1
        assert result.stderr.startswith(f"deployd: NOT_FOUND: no model '{name}' is loaded"), result.stderr
        again = deployd("unload", "--model", name, "--json", "--address", target)
        assert again.returncode == 1 and again.stderr.startswith("deployd: NOT_FOUND: "), again.stderr
    finally:
        unload_model(target, name)


def test_unload_by_target_form_object_and_package(daemon: DaemonProcess, tmp_path: Path) -> None:
    path = tmp_path / "own.pt"
    with PackageExporter(str(path)) as exporter:  # bytes no other test loads: unloading it hurts none
        exporter.save_pickle("data", "data.pkl", {"unique": uuid.uuid4().hex})
    loaded = deployd(
        "load", str(path), "--pickle", "data:data.pkl", "--pickle", "data:data.pkl", "--json",
        "--address", daemon.target,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    report = json.loads(loaded.stdout)
    first, second = (obj["object_id"] for obj in report["objects"])
    assert [(obj["name"], obj["version"]) for obj in report["objects"]] == [(None, 0), (None, 0)]
    try:
        by_id = deployd("unload", first, "--json", "--address", daemon.target)
        assert by_id.returncode == 0, by_id.stderr
        assert json.loads(by_id.stdout) == {"object_ids": [first]}
        by_package = deployd("unload", report["package_id"], "--address", daemon.target)
        assert by_package.returncode == 0, by_package.stderr
        assert by_package.stdout == f"unloaded package {report['package_id']}\nunloaded object {second}\n"
    finally:
        unload_objects(daemon.target, [first, second])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["resnet"], ("model", "resnet")),
        (["obj-0123456789abcdef"], ("object", "obj-0123456789abcdef")),
        (["ab" * 32], ("package", "ab" * 32)),
        (["AB" * 32], ("model", "AB" * 32)),  # package ids are lowercase hex
        (["--model", "ab" * 32], ("model", "ab" * 32)),  # a name that looks like a package id
        (["--object", "obj-0123456789abcdef"], ("object", "obj-0123456789abcdef")),
        (["--package", "ab" * 32], ("package", "ab" * 32)),
    ],
    ids=["name", "object", "package", "uppercase-hex", "--model", "--object", "--package"],
)
def test_unload_target_kind(args: list[str], expected: tuple[str, str]) -> None:
    assert commands._unload_target(build_parser().parse_args(["unload", *args])) == expected


def test_status_text_shows_draining_versions() -> None:
    version = {"object_id": "obj-1", "calls_in_flight": 3, "package_id": "p" * 64, "module": "m", "file": "f.pkl"}
    report = {
        "workers": [],
        "queued_calls": 0,
        "models": [
            {
                "name": "swap",
                "serving_version": 0,  # unloaded while it drained: none serves
                "versions": [{**version, "version": 1, "state": "draining"}],
            }
        ],
        "packages": [],
        "objects": [],
        "modules": [],
        "sessions": [{"session_id": "s1", "worker": 1, "objects": 4, "idle_seconds": 2.5, "steps_running": 0}],
    }
    lines = status_text(report).splitlines()
    assert lines[lines.index("sessions: 1") + 2].split() == ["s1", "1", "4", "2.5", "0"]
    at = lines.index("  swap  serving version none")
    assert lines[at + 2].split() == ["1", "draining", "obj-1", "3", "m:f.pkl", "p" * 64]


def test_serve_with_a_bad_config_exits_config_error(tmp_path: Path) -> None:
    config = tmp_path / "deployd.yaml"
    config.write_text("pool:\n  workers: many\n")
    result = deployd("serve", "--config", str(config))
    assert result.returncode == ExitCode.CONFIG_ERROR.value == 2, result.stderr
    assert "pool.workers" in result.stderr, result.stderr


def test_readme_exit_codes_table_lists_every_code() -> None:
    """The README's "Exit codes" table: one row per ExitCode and WorkerExitCode member, with its number."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert [cell.strip() for cell in header[:3]] == ["process", "code", "name"]
    listed = {cell[2].strip().strip("`"): int(cell[1]) for cell in body}
    expected = {f"ExitCode.{code.name}": code.value for code in ExitCode}
    expected |= {f"WorkerExitCode.{code.name}": code.value for code in WorkerExitCode}
    assert listed == expected
    assert {cell[0].strip() for cell in body if cell[2].strip().strip("`").startswith("ExitCode.")} == {"daemon"}
