"""Limits (config section `limits`, worker rlimits, worker.user): each refusal is a clear
status naming its key, and the daemon keeps serving."""

from __future__ import annotations

import asyncio
import importlib
import os
import pwd
import sys
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from torch.package import PackageExporter

from client import InterpreterManager, InvalidArgumentError, Package, RemoteError, ResourceExhaustedError
from server.app.config import Config
from server.errors import TooLarge
from server.models.packages import PackageStore
from tests.conftest import HERE, write_config
from tests.daemon_process import DaemonProcess, shm_segments

_LIMITS: dict[str, object] = {
    "max_value_depth": 8,
    "max_tensor_rank": 4,
    "max_tensor_elements": 1000,
    "max_container_items": 100,
    "max_package_unpacked_bytes": 16 * 1024 * 1024,
    "max_packages": 2,
    "max_objects": 2,
}
# A fresh worker maps about 620 MiB (torch, from the fork server): room for it and its calls.
_ADDRESS_SPACE = 2 * 1024 * 1024 * 1024
_OPEN_FILES = 64


@pytest.fixture(scope="module")
def hostile_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(HERE / "package_sources" / "hostile"))
    try:
        hostile = importlib.import_module("hostile")
    finally:
        sys.path.pop(0)
    path = tmp_path_factory.mktemp("hostile") / "hostile.pt"
    with PackageExporter(str(path)) as exporter:
        exporter.intern("hostile")
        exporter.save_pickle("hostile_model", "model.pkl", hostile.Hostile())
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The limited daemon's package store."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def limited(package_dir: Path, store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    config = write_config(
        tmp_path_factory.mktemp("limited") / "config.yaml",
        package_dir,
        pool={"workers": 1},
        packages={"directory": str(package_dir), "store_directory": str(store)},
        limits=_LIMITS,
        worker={"max_open_files": _OPEN_FILES, "max_address_space_bytes": _ADDRESS_SPACE},
    )
    process = DaemonProcess(config).start()
    try:
        yield process
    finally:
        process.assert_clean_stop()


@pytest.fixture
def client(limited: DaemonProcess) -> Iterator[InterpreterManager]:
    with InterpreterManager(limited.target, timeout=60) as manager:
        for record in manager.status().packages:  # each test starts with nothing loaded
            Package(manager, record.package_id).unload()
        yield manager


def assert_still_serving(manager: InterpreterManager, package_dir: Path) -> None:
    package = manager.load_package(package_dir / "models.pt")
    scale = package.load_pickle("models", "scale.pkl")
    assert torch.equal(scale(torch.ones(2)), torch.full((2,), 2.0))
    package.unload()


def nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (nested(9), "limits.max_value_depth"),
        (list(range(101)), "limits.max_container_items"),
        ((0,) * 101, "limits.max_container_items"),
        ({str(key): key for key in range(101)}, "limits.max_container_items"),
        (torch.zeros(1, 1, 1, 1, 1), "limits.max_tensor_rank"),
        (torch.zeros(1001, dtype=torch.uint8), "limits.max_tensor_elements"),
        ([[torch.zeros(10, 101)]], "limits.max_tensor_elements"),
    ],
    ids=["depth", "list", "tuple", "dict", "rank", "elements", "nested-elements"],
)
def test_a_value_past_a_limit_is_invalid_argument(
    client: InterpreterManager, package_dir: Path, value: object, key: str
) -> None:
    echo = client.load_package(package_dir / "models.pt").load_pickle("models", "echo.pkl")
    with pytest.raises(InvalidArgumentError, match=key.replace(".", r"\.")) as raised:
        echo(value)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert echo(nested(8)) == nested(8)  # at the limit is fine
    assert echo(list(range(100))) == list(range(100))
    assert torch.equal(echo(torch.ones(10, 10, 1, 10)), torch.ones(10, 10, 1, 10))
    assert_still_serving(client, package_dir)


def test_package_and_object_counts(client: InterpreterManager, package_dir: Path) -> None:
    models = client.load_package(package_dir / "models.pt")
    conv = client.load_package(package_dir / "conv.pt")
    with pytest.raises(ResourceExhaustedError, match=r"2 packages are loaded.*limits\.max_packages"):
        client.load_package(package_dir / "twin_a.pt")
    assert client.load_package(package_dir / "models.pt").id == models.id  # already loaded
    models.load_pickle("models", "echo.pkl")
    scale = models.load_pickle("models", "scale.pkl")
    with pytest.raises(ResourceExhaustedError, match=r"2 objects are loaded.*limits\.max_objects"):
        conv.load_pickle("model", "model.pkl")
    scale.unload()
    conv.load_pickle("model", "model.pkl")
    conv.unload()
    client.load_package(package_dir / "twin_a.pt").unload()
    assert len(client.status().packages) == 1


def write_zip_bomb(path: Path, unpacked_bytes: int) -> None:
    """One entry of zeros, deflated: 1 GiB takes about 1 MB and a second to build.

    After a full flush deflate starts afresh, so every 16 MiB of zeros compresses to the
    same bytes: compress it once and repeat them."""
    chunk = bytes(min(1 << 24, unpacked_bytes))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    count = unpacked_bytes // len(chunk)
    stream = block * count + compressor.flush()
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(chunk, crc)
    info = zipfile.ZipInfo("bomb/.data/0.storage")
    info.compress_type = zipfile.ZIP_DEFLATED
    info.file_size, info.compress_size, info.CRC = count * len(chunk), len(stream), crc
    with zipfile.ZipFile(path, "w") as archive:  # what writestr does, with the stream made above
        assert archive.fp is not None
        info.header_offset = archive.fp.tell()
        archive.fp.write(info.FileHeader())
        archive.fp.write(stream)
        archive.filelist.append(info)
        archive.NameToInfo[info.filename] = info
        archive.start_dir = archive.fp.tell()  # type: ignore[attr-defined]


def test_a_zip_bomb_is_refused_before_staging(
    client: InterpreterManager, limited: DaemonProcess, store: Path, package_dir: Path, tmp_path: Path
) -> None:
    bomb = tmp_path / "bomb.pt"
    write_zip_bomb(bomb, 1 << 30)
    assert bomb.stat().st_size < 2 * 1024 * 1024
    small_bomb = tmp_path / "small_bomb.pt"
    write_zip_bomb(small_bomb, 8 * 1024 * 1024)  # under the size limit; over the ratio of 100
    segments = shm_segments()
    with pytest.raises(ResourceExhaustedError, match=r"1073741824 bytes.*limits\.max_package_unpacked_bytes"):
        client.load_package(bomb)
    with pytest.raises(ResourceExhaustedError, match=r"8388608 bytes.*limits\.max_package_compression_ratio"):
        client.load_package(small_bomb)
    assert client.status().packages == []
    assert not {name for name in shm_segments() - segments if name.startswith(f"deployd-{limited.pid}-")}, "staged"
    assert os.listdir(store) == [], "the refused archives are not kept"
    assert_still_serving(client, package_dir)


async def chunks_of(path: Path) -> AsyncIterator[bytes]:
    yield path.read_bytes()


def test_the_default_limits_refuse_a_zip_bomb(package_dir: Path, tmp_path: Path) -> None:
    """The store alone, with the defaults: 1 GiB from 1 MB is over the ratio of 100; a real package is not."""
    bomb = tmp_path / "bomb.pt"
    write_zip_bomb(bomb, 1 << 30)
    defaults = Config()
    (tmp_path / "store").mkdir()
    store = PackageStore(
        tmp_path / "store",
        package_dir,
        defaults.packages.max_bytes,
        defaults.limits.max_package_unpacked_bytes,
        defaults.limits.max_package_compression_ratio,
    )
    with pytest.raises(TooLarge, match=r"limits\.max_package_compression_ratio"):
        asyncio.run(store.save(chunks_of(bomb)))
    assert (
        asyncio.run(store.save(chunks_of(package_dir / "big.pt"))).size_bytes == (package_dir / "big.pt").stat().st_size
    )
    assert len(os.listdir(tmp_path / "store")) == 1


def test_worker_open_files_limit(client: InterpreterManager, package_dir: Path, hostile_package: Path) -> None:
    model = client.load_package(hostile_package).load_pickle("hostile_model", "model.pkl")
    assert model.call_method("rlimits")[0] == [_OPEN_FILES, _OPEN_FILES]
    with pytest.raises(RemoteError, match="Too many open files") as raised:
        model.call_method("open_files", 200)
    assert raised.value.remote_type == "OSError"
    assert model.call_method("open_files", 20) == 20
    assert_still_serving(client, package_dir)


def test_worker_address_space_limit(client: InterpreterManager, package_dir: Path, hostile_package: Path) -> None:
    model = client.load_package(hostile_package).load_pickle("hostile_model", "model.pkl")
    assert model.call_method("rlimits")[1] == [_ADDRESS_SPACE, _ADDRESS_SPACE]
    with pytest.raises(RemoteError) as raised:
        model.call_method("allocate", 4 * _ADDRESS_SPACE)
    assert raised.value.remote_type == "MemoryError"
    with pytest.raises(RemoteError, match="allocate") as raised:
        model.call_method("allocate_tensor", 4 * _ADDRESS_SPACE)
    assert raised.value.remote_type == "RuntimeError"
    assert model.call_method("allocate", 64 * 1024 * 1024) == 64 * 1024 * 1024
    assert client.status().workers[0].restarts == 0, "the worker lived through it"
    assert_still_serving(client, package_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run workers as another user")
def test_workers_run_as_another_user(package_dir: Path, hostile_package: Path, tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    config = write_config(tmp_path / "config.yaml", package_dir, pool={"workers": 1}, worker={"user": "nobody"})
    token = "admin-token-for-the-test"
    process = DaemonProcess(config, env={"DEPLOYD_AUTH_ADMIN_TOKENS": token}).start()
    try:
        with InterpreterManager(process.target, timeout=60, token=token) as manager:
            model = manager.load_package(hostile_package).load_pickle("hostile_model", "model.pkl")
            assert model.call_method("ids") == [nobody.pw_uid] * 2 + [nobody.pw_gid] * 2
            assert model.call_method("environ", "DEPLOYD_AUTH_ADMIN_TOKENS") == "", "model code cannot read tokens"
            big = torch.rand(512, 1024)  # 2 MiB each way: through the shared-memory arenas
            assert torch.equal(model.call_method("echo", big), big)
            weights = manager.load_package(package_dir / "big.pt").load_pickle("big", "model.pkl")  # shared weights
            assert weights(torch.ones(1, 1200)).shape == (1, 1200)
    finally:
        process.assert_clean_stop()
