"""Config: precedence, types, and clear errors for unknown keys and bad values (no daemon)."""

from __future__ import annotations

import dataclasses
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from server.app.config import Config, ConfigError, load_config, worker_user
from server.batching.batcher import BatchPolicy
from server.models.entry import ModelEntry, TensorSpec
from server.models.warmup import Warmup
from tests.daemon_process import REPO


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bundled_config_is_the_defaults_and_the_seed_model() -> None:
    """Every section at its defaults but HTTP, which `make serve` serves on 127.0.0.1:8000 (off by
    default: a daemon opens only the ports its config names); the one model `make serve` exports
    and serves by name."""
    bundled = load_config(REPO / "config.yaml", environ={})
    seed = ModelEntry("seed", "seed.pt", "model", "model.pkl", warmup=Warmup(("rand:1,1,28,28",)))
    assert bundled.models == (seed,)
    assert bundled.server.http_address == "127.0.0.1:8000"
    server = dataclasses.replace(bundled.server, http_address="")
    assert dataclasses.replace(bundled, models=(), server=server) == Config()


def test_http_address(tmp_path: Path) -> None:
    assert load_config(environ={"DEPLOYD_SERVER_HTTP_ADDRESS": "127.0.0.1:0"}).server.http_address == "127.0.0.1:0"
    with pytest.raises(ConfigError, match=r"server\.http_address"):
        load_config(environ={"DEPLOYD_SERVER_HTTP_ADDRESS": "8000"})
    with pytest.raises(ConfigError, match=r"server\.http_max_body_bytes"):
        load_config(environ={"DEPLOYD_SERVER_HTTP_MAX_BODY_BYTES": "0"})
    # Off loopback, HTTP needs tokens as gRPC does.
    with pytest.raises(ConfigError, match=r"server\.http_address .0\.0\.0\.0:8000. is reachable from other machines"):
        load_config(environ={"DEPLOYD_SERVER_HTTP_ADDRESS": "0.0.0.0:8000"})
    remote = {"DEPLOYD_SERVER_HTTP_ADDRESS": "0.0.0.0:8000", "DEPLOYD_AUTH_INVOKE_TOKENS": "t"}
    assert load_config(environ=remote).server.http_address == "0.0.0.0:8000"


def test_models_on_error_from_the_environment(tmp_path: Path) -> None:
    config_file = write(tmp_path / "c.yaml", "models_on_error: stop\n")
    assert load_config(config_file, environ={"DEPLOYD_MODELS_ON_ERROR": "continue"}).models_on_error == "continue"
    with pytest.raises(ConfigError, match="models_on_error"):
        load_config(config_file, environ={"DEPLOYD_MODELS_ON_ERROR": "maybe"})
    with pytest.raises(ConfigError, match="models must be a list"):
        load_config(write(tmp_path / "d.yaml", "models: {name: x}\n"), environ={})


def test_precedence_flags_over_environment_over_file(tmp_path: Path) -> None:
    config_file = write(tmp_path / "c.yaml", "server:\n  address: 127.0.0.1:1111\npool:\n  workers: 3\n")
    from_file = load_config(config_file, environ={})
    assert (from_file.server.address, from_file.pool.workers) == ("127.0.0.1:1111", 3)
    environ = {"DEPLOYD_SERVER_ADDRESS": "127.0.0.1:2222", "DEPLOYD_WORKER_EXTRA_SYS_PATHS": "/a:/b"}
    from_env = load_config(config_file, environ=environ)
    assert from_env.server.address == "127.0.0.1:2222"
    assert from_env.pool.workers == 3
    assert from_env.worker.extra_sys_paths == ("/a", "/b")
    from_flags = load_config(config_file, environ=environ, overrides={"server.address": "127.0.0.1:3333"})
    assert from_flags.server.address == "127.0.0.1:3333"


def test_workers_zero_means_one_per_core() -> None:
    assert load_config(environ={"DEPLOYD_POOL_WORKERS": "0"}).worker_count >= 1
    assert load_config(environ={"DEPLOYD_POOL_WORKERS": "5"}).worker_count == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nonsense:\n  a: 1\n", "unknown config section 'nonsense'"),
        ("pool:\n  wrokers: 2\n", "unknown key pool.wrokers"),
        ("pool:\n  workers: many\n", "bad value for pool.workers: 'many'"),
        ("pool:\n  workers: -1\n", "bad value for pool.workers: -1"),
        ("server:\n  address: nowhere\n", "bad value for server.address: 'nowhere'"),
        ("worker:\n  extra_sys_paths: /not/a/list\n", "bad value for worker.extra_sys_paths"),
        ("worker:\n  num_threads: true\n", "bad value for worker.num_threads: True"),
        ("- a list\n", "must hold a mapping"),
        ("server: [\n", "not valid YAML"),
    ],
)
def test_bad_config_is_refused_with_the_key_and_value(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(write(tmp_path / "c.yaml", text), environ={})


def test_bad_environment_value_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"bad value for worker\.num_threads: 'x'"):
        load_config(environ={"DEPLOYD_WORKER_NUM_THREADS": "x"})


def test_cli_reports_bad_config_and_exits_2(tmp_path: Path) -> None:
    config_file = write(tmp_path / "c.yaml", "pool:\n  wrokers: 2\n")
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--config", str(config_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown key pool.wrokers" in result.stderr


def test_boolean_keys() -> None:
    assert load_config(environ={"DEPLOYD_SERVER_TUNE_MALLOC": "false"}).server.tune_malloc is False
    assert load_config(environ={}).server.tune_malloc is True
    with pytest.raises(ConfigError, match=r"bad value for server\.tune_malloc: 'maybe'"):
        load_config(environ={"DEPLOYD_SERVER_TUNE_MALLOC": "maybe"})


@pytest.mark.parametrize("address", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051"])
def test_a_remote_bind_without_tokens_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="reachable from other machines but no auth tokens"):
        load_config(environ={"DEPLOYD_SERVER_ADDRESS": address})
    with_tokens = load_config(environ={"DEPLOYD_SERVER_ADDRESS": address, "DEPLOYD_AUTH_ADMIN_TOKENS": "a:b"})
    assert with_tokens.auth.admin_tokens == ("a", "b")
    allowed = {"DEPLOYD_SERVER_ADDRESS": address, "DEPLOYD_AUTH_ALLOW_UNAUTHENTICATED_REMOTE": "true"}
    assert load_config(environ=allowed).auth.allow_unauthenticated_remote


def test_remote_data_ports_without_tokens_are_refused() -> None:
    remote_ports = {"DEPLOYD_POOL_DATA_PORTS": "50100", "DEPLOYD_POOL_DATA_HOST": "0.0.0.0"}
    with pytest.raises(ConfigError, match=r"pool\.data_host '0\.0\.0\.0' .* no auth tokens"):
        load_config(environ=remote_ports)
    assert load_config(environ={**remote_ports, "DEPLOYD_AUTH_INVOKE_TOKENS": "t"}).pool.data_ports == 50100
    allowed = {**remote_ports, "DEPLOYD_AUTH_ALLOW_UNAUTHENTICATED_REMOTE": "true"}
    assert load_config(environ=allowed).data_host == "0.0.0.0"
    # Off, the host says nothing; on loopback (server.address's host by default), no tokens needed.
    off = {"DEPLOYD_POOL_DATA_HOST": "0.0.0.0", "DEPLOYD_POOL_DATA_PORTS": "-1"}
    assert load_config(environ=off).pool.data_ports == -1
    assert load_config(environ={}).pool.data_ports == 0  # on by default, on free ports
    assert load_config(environ={"DEPLOYD_POOL_DATA_PORTS": "0"}).data_host == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"bad value for pool\.data_ports: -2"):
        load_config(environ={"DEPLOYD_POOL_DATA_PORTS": "-2"})


@pytest.mark.parametrize("address", ["127.0.0.1:0", "localhost:50051", "[::1]:50051"])
def test_loopback_needs_no_tokens(address: str) -> None:
    assert load_config(environ={"DEPLOYD_SERVER_ADDRESS": address}).server.address == address


def test_cli_refuses_a_remote_bind_without_tokens() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--address", "0.0.0.0:0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "no auth tokens" in result.stderr


def test_tls_and_token_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls\.key_file"):
        load_config(environ={"DEPLOYD_TLS_CERT_FILE": str(tmp_path)})
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match=r"tls\.cert_file.*not a readable file"):
        load_config(environ={"DEPLOYD_TLS_CERT_FILE": missing, "DEPLOYD_TLS_KEY_FILE": missing})
    with pytest.raises(ConfigError, match="auth tokens") as raised:
        load_config(environ={"DEPLOYD_AUTH_INVOKE_TOKENS": "has space"})
    assert "has space" not in str(raised.value), "a token must never appear in a message"
    with pytest.raises(ConfigError, match=r"server\.log_format"):
        load_config(environ={"DEPLOYD_SERVER_LOG_FORMAT": "xml"})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"DEPLOYD_LIMITS_MAX_VALUE_DEPTH": "0"}, "limits.max_value_depth: 0"),
        ({"DEPLOYD_LIMITS_MAX_VALUE_DEPTH": "33"}, "limits.max_value_depth: 33"),
        ({"DEPLOYD_LIMITS_MAX_TENSOR_RANK": "0"}, "limits.max_tensor_rank: 0"),
        ({"DEPLOYD_LIMITS_MAX_TENSOR_ELEMENTS": "0"}, "limits.max_tensor_elements: 0"),
        ({"DEPLOYD_LIMITS_MAX_CONTAINER_ITEMS": "0"}, "limits.max_container_items: 0"),
        ({"DEPLOYD_LIMITS_MAX_PACKAGE_UNPACKED_BYTES": "-1"}, "limits.max_package_unpacked_bytes: -1"),
        ({"DEPLOYD_LIMITS_MAX_PACKAGE_COMPRESSION_RATIO": "-2.5"}, "limits.max_package_compression_ratio: -2.5"),
        ({"DEPLOYD_LIMITS_MAX_PACKAGES": "-1"}, "limits.max_packages: -1"),
        ({"DEPLOYD_LIMITS_MAX_OBJECTS": "many"}, "limits.max_objects: 'many'"),
        ({"DEPLOYD_WORKER_MAX_OPEN_FILES": "5"}, "worker.max_open_files: 5"),
        ({"DEPLOYD_WORKER_MAX_ADDRESS_SPACE_BYTES": "-1"}, "worker.max_address_space_bytes: -1"),
        ({"DEPLOYD_WORKER_USER": "no-such-user-here"}, "worker.user: 'no-such-user-here' is not a user on this host"),
    ],
)
def test_bad_limits_are_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=f"bad value for {message}".replace(".", r"\.")):
        load_config(environ=environ)


def test_limits_and_worker_resources() -> None:
    config = load_config(
        environ={
            "DEPLOYD_LIMITS_MAX_PACKAGES": "0",
            "DEPLOYD_LIMITS_MAX_PACKAGE_COMPRESSION_RATIO": "20",
            "DEPLOYD_WORKER_MAX_OPEN_FILES": "256",
            "DEPLOYD_WORKER_MAX_ADDRESS_SPACE_BYTES": "8589934592",
        }
    )
    assert (config.limits.max_packages, config.limits.max_package_compression_ratio) == (0, 20.0)
    assert (config.worker.max_open_files, config.worker.max_address_space_bytes) == (256, 8 * 1024**3)
    assert Config().worker.max_open_files == 0 and Config().worker.max_address_space_bytes == 0  # off by default


def test_worker_user_needs_root_unless_it_is_the_daemons_own(monkeypatch: pytest.MonkeyPatch) -> None:
    own = pwd.getpwuid(os.geteuid()).pw_name
    assert load_config(environ={"DEPLOYD_WORKER_USER": own}).worker.user == own
    assert worker_user(str(os.geteuid()))[0] == os.geteuid()
    other = "nobody" if os.geteuid() != pwd.getpwnam("nobody").pw_uid else "root"
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    with pytest.raises(ConfigError, match="only a daemon started as root"):
        load_config(environ={"DEPLOYD_WORKER_USER": other})


def test_model_entries_declare_their_tensors(tmp_path: Path) -> None:
    text = """models:
  - name: classifier
    package: c.pt
    pickle: model:model.pkl
    inputs: [{name: image, datatype: FP32, shape: [-1, 3, 224, 224]}]
    outputs: [{name: logits, datatype: FP32, shape: [-1, 1000]}, {name: label, datatype: BYTES, shape: [-1]}]
"""
    (entry,) = load_config(write(tmp_path / "c.yaml", text), environ={}).models
    assert entry.inputs == (TensorSpec("image", "FP32", (-1, 3, 224, 224)),)
    assert [spec.name for spec in entry.outputs] == ["logits", "label"]


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        ("inputs: [{name: x, datatype: UINT16, shape: [1]}]", "datatype must be one of"),
        ("inputs: [{name: x, datatype: FP32, shape: [-2]}]", "shape must be a list of sizes"),
        ("inputs: [{name: 2x, datatype: FP32, shape: [1]}]", "must be a Python identifier"),
        ("inputs: [{name: x, datatype: FP32}]", "exactly the keys name, datatype and shape"),
        ("outputs: {name: y}", "must be a list of tensors"),
        ("inputs: [{name: x, datatype: FP32, shape: []}, {name: x, datatype: FP32, shape: []}]", "listed twice"),
        ("signature: []", "may have inputs, outputs"),
    ],
)
def test_bad_tensor_declarations(tmp_path: Path, declaration: str, message: str) -> None:
    text = f"models:\n  - name: m\n    package: m.pt\n    pickle: a:b\n    {declaration}\n"
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path / "c.yaml", text), environ={})


def test_model_entries_configure_batching(tmp_path: Path) -> None:
    batching = "{max_batch_size: 8, preferred_batch_sizes: [4]}"
    text = f"models:\n  - {{name: m, package: m.pt, pickle: a:b, batching: {batching}}}\n"
    (entry,) = load_config(write(tmp_path / "c.yaml", text), environ={}).models
    assert entry.batching == BatchPolicy(8, 2.0, (4,))
    for batching, message in (
        ("{max_queue_delay_ms: 2}", "with max_batch_size"),
        ("{max_batch_size: 0}", "max_batch_size must be 1 to"),
        ("{max_batch_size: 4, preferred_batch_sizes: [8]}", "not 1 to max_batch_size"),
        ("{max_batch_size: 4, max_queue_delay_ms: fast}", "a number"),
    ):
        text = f"models:\n  - {{name: m, package: m.pt, pickle: a:b, batching: {batching}}}\n"
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path / "c.yaml", text), environ={})
