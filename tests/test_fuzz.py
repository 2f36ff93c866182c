"""Fuzz a live daemon: garbage request bytes, random wire values, mutated package archives.

Every answer must be a proper status (never INTERNAL; UNKNOWN only for an exception of
model code, which carries its type), the daemon must stay up and answer a normal call
after each round, and it must end without a leaked worker or /dev/shm segment.

Bounded in time: DEPLOYD_FUZZ_SECONDS (default 20, shared by the three tests; `make fuzz`
runs 300). Each test's random generator is seeded from DEPLOYD_FUZZ_SEED (random when
unset): a failure prints the seed, and the same seed replays the same inputs.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from client import InterpreterManager, NotFoundError
from client._proto import deployd_pb2 as pb
from server.pool.procinfo import descendants_of
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, shm_segments, wait_until

FUZZ_SECONDS = float(os.environ.get("DEPLOYD_FUZZ_SECONDS", "20"))
SEED = int(os.environ.get("DEPLOYD_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
CALL_TIMEOUT = 30.0  # a call that takes longer has hung: DEADLINE_EXCEEDED fails the test
SERVICE = "/deployd.v1.Deployd/"
ERROR_DETAIL_KEY = "deployd-error-detail-bin"
Code = grpc.StatusCode
# What any request may get. UNKNOWN is allowed only with the model's exception attached.
REFUSALS = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.PERMISSION_DENIED, Code.RESOURCE_EXHAUSTED}
PROPER = {Code.OK, *REFUSALS, Code.UNKNOWN}


def rng_for(test: str) -> random.Random:
    return random.Random(SEED ^ zlib.crc32(test.encode()))


def replay_hint(test: str) -> str:
    return f"replay: DEPLOYD_FUZZ_SEED={SEED} DEPLOYD_FUZZ_SECONDS={FUZZ_SECONDS:g} pytest tests/test_fuzz.py::{test}"


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    response: bytes
    remote_type: str = ""

    def __str__(self) -> str:
        return f"{self.code.name} {self.details!r}" + (f" (remote {self.remote_type})" if self.remote_type else "")


def answer_of(call: Callable[[], bytes]) -> Answer:
    try:
        return Answer(Code.OK, "", call())
    except grpc.RpcError as error:
        remote_type = ""
        for key, value in error.trailing_metadata() or ():
            if key == ERROR_DETAIL_KEY:
                remote_type = pb.ErrorDetail.FromString(value).remote_type
        return Answer(error.code(), error.details() or "", b"", remote_type)


@dataclass
class Target:
    """The daemon under fuzz, a raw channel to it (bytes in, bytes out) and the objects fuzzed at."""

    daemon: DaemonProcess
    package_dir: Path
    channel: grpc.Channel
    manager: InterpreterManager
    echo_id: str = ""
    models_id: str = ""
    victim_object: str = ""
    victim_package: str = ""
    workers: int = 0
    log: list[str] = field(default_factory=list, repr=False)

    def call(self, method: str, payload: bytes) -> Answer:
        rpc = self.channel.unary_unary(SERVICE + method)
        return answer_of(lambda: rpc(payload, timeout=CALL_TIMEOUT))

    def load_package(self, chunks: list[bytes]) -> Answer:
        rpc = self.channel.stream_unary(SERVICE + "LoadPackage")
        return answer_of(lambda: rpc(iter(chunks), timeout=CALL_TIMEOUT))

    def reload(self) -> None:
        """(Re)load what the fuzz aims at; a mutated request may have unloaded it."""
        models = self.manager.load_package(self.package_dir / "models.pt")
        self.models_id = models.id
        if not self.has(self.echo_id, "pair"):
            self.echo_id = models.load_pickle("models", "echo.pkl").id
        victim = self.manager.load_package(self.package_dir / "twin_a.pt")
        self.victim_package = victim.id
        if not self.has(self.victim_object, "__call__"):
            self.victim_object = victim.load_pickle("twins", "twin.pkl").id

    def has(self, object_id: str, name: str) -> bool:
        if not object_id:
            return False
        try:
            return bool(
                self.manager.call(self.manager._stub.HasAttr, pb.HasAttrRequest(object_id=object_id, name=name)).present
            )
        except NotFoundError:
            return False

    def assert_serving(self, context: str) -> None:
        """The daemon is up, a normal call works, and its workers are as many as at the start."""
        assert self.daemon.process is not None and self.daemon.process.poll() is None, (
            f"the daemon died ({context}):\n{self.daemon.log[-5000:]}"
        )
        try:
            self.reload()
            request = pb.InvokeRequest(object_id=self.echo_id, args=[pb.Value(string_value="still here")])
            result = self.manager.call(self.manager._stub.Invoke, request).result
        except grpc.RpcError as error:  # pragma: no cover - a failure report
            raise AssertionError(f"a normal call failed after {context}: {error}") from error
        assert result.string_value == "still here", context
        assert wait_until(lambda: len(descendants_of(self.daemon.pid)) == self.workers, 30), (
            f"{context}: the daemon has {len(descendants_of(self.daemon.pid))} descendants, {self.workers} at the start"
        )

    def check(self, answer: Answer, allowed: set[grpc.StatusCode], what: str, test: str) -> None:
        self.log.append(f"{what}: {answer}")
        proper = answer.code in allowed and (answer.code != Code.UNKNOWN or answer.remote_type)
        assert proper, f"{what}\n  got {answer}\n  {replay_hint(test)}"

    def daemon_segments(self) -> set[str]:
        return {name for name in shm_segments() if name.startswith(f"deployd-{self.daemon.pid}-")}


@pytest.fixture(scope="module")
def target(package_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    config = write_config(tmp_path_factory.mktemp("fuzz") / "config.yaml", package_dir)
    daemon = DaemonProcess(config).start()
    print(f"fuzz seed {SEED}, {FUZZ_SECONDS:g} s")
    try:
        channel = grpc.insecure_channel(daemon.target)
        with InterpreterManager(daemon.target, timeout=CALL_TIMEOUT) as manager:
            fuzzed = Target(daemon, package_dir, channel, manager)
            fuzzed.reload()
            fuzzed.workers = len(descendants_of(daemon.pid))
            yield fuzzed
            fuzzed.assert_serving("the last test")
        channel.close()
    finally:
        daemon.assert_clean_stop()


def rounds(seconds: float, most: int) -> Iterator[int]:
    """Round numbers until the time is up (at least one round), at most `most`."""
    deadline = time.monotonic() + seconds
    for number in range(most):
        if number and time.monotonic() > deadline:
            return
        yield number


# ------------------------------------------------------------------ byte mutations


def mutate(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """A few random edits of data: bit flips, new bytes, insertions, deletions, cuts, splices."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        position = rng.randint(0, len(out))
        edit = rng.choice(["flip", "set", "insert", "delete", "truncate", "repeat", "splice", "varint"])
        if edit == "flip" and out:
            out[position % len(out)] ^= 1 << rng.randrange(8)
        elif edit == "set" and out:
            out[position % len(out)] = rng.choice([0, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif edit == "insert":
            out[position:position] = rng.randbytes(rng.randint(1, 8))
        elif edit == "delete":
            del out[position : position + rng.randint(1, 8)]
        elif edit == "truncate":
            del out[position:]
        elif edit == "repeat":
            out[position:position] = out[position : position + rng.randint(1, 16)] * rng.randint(1, 4)
        elif edit == "splice" and others:
            other = rng.choice(others)
            cut = rng.randint(0, len(other))
            out[position:] = other[cut:]
        elif edit == "varint":  # a length or tag that claims a lot
            out[position:position] = bytes([rng.randrange(256) | 0x80 for _ in range(rng.randint(1, 9))]) + b"\x01"
    return bytes(out)


def base_requests(target: Target) -> dict[str, list[bytes]]:
    """Valid serialized requests of every unary method, to mutate."""
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 2], data=bytes(16))
    invoke = pb.InvokeRequest(
        object_id=target.echo_id,
        args=[pb.Value(tensor_value=tensor)],
        kwargs={},
    )
    pair = pb.InvokeRequest(
        object_id=target.echo_id,
        method="pair",
        args=[pb.Value(int_value=7), pb.Value(list_value=pb.ValueList(items=[pb.Value(string_value="x")]))],
        kwargs={"k": pb.Value(dict_value=pb.Dict(entries=[pb.DictEntry(int_key=3, value=pb.Value(bool_value=True))]))},
    )
    resource = {"package_id": target.models_id, "module": "models"}
    requests: dict[str, list[Any]] = {
        "Invoke": [invoke, pair],
        "LoadPickle": [pb.LoadPickleRequest(package_id=target.models_id, module="models", file="echo.pkl")],
        "HasAttr": [pb.HasAttrRequest(object_id=target.echo_id, name="pair")],
        "UnloadObject": [pb.UnloadObjectRequest(object_id=target.victim_object)],
        "UnloadPackage": [pb.UnloadPackageRequest(package_id=target.victim_package)],
        "LoadText": [pb.LoadResourceRequest(**resource, resource="notes.txt")],
        "LoadBinary": [pb.LoadResourceRequest(**resource, resource="blob.bin")],
        "RegisterModuleSource": [pb.RegisterModuleSourceRequest(name="deployd_fuzzed", source="VALUE = 1\n")],
        "Status": [pb.StatusRequest()],
    }
    return {method: [message.SerializeToString() for message in messages] for method, messages in requests.items()}


def clean_up_after(target: Target, method: str, answer: Answer) -> None:
    """Undo what a fuzzed request that succeeded loaded, so nothing piles up."""
    if answer.code != Code.OK:
        return
    if method == "LoadPickle":
        object_id = pb.LoadPickleResponse.FromString(answer.response).object_id
        if object_id not in (target.echo_id, target.victim_object):
            target.call("UnloadObject", pb.UnloadObjectRequest(object_id=object_id).SerializeToString())


def test_garbage_request_bytes(target: Target) -> None:
    """Random and mutated bytes as the request of every unary method."""
    test = "test_garbage_request_bytes"
    rng = rng_for(test)
    bases = base_requests(target)
    every_base = [request for requests in bases.values() for request in requests]
    for number in rounds(FUZZ_SECONDS * 0.25, 20_000):
        method = rng.choice(sorted(bases))
        if rng.random() < 0.15:
            payload = rng.randbytes(rng.randint(0, 64))
        else:
            payload = mutate(rng, rng.choice(bases[method]), every_base)
        answer = target.call(method, payload)
        target.check(answer, PROPER, f"{method} with bytes {payload.hex()}", test)
        clean_up_after(target, method, answer)
        if number % 200 == 199:
            target.assert_serving(f"{number + 1} garbage requests")
            bases = base_requests(target)
    target.assert_serving("garbage request bytes")


# ------------------------------------------------------------------ random wire values

DTYPE_SIZES = {
    pb.DTYPE_FLOAT16: 2,
    pb.DTYPE_FLOAT32: 4,
    pb.DTYPE_FLOAT64: 8,
    pb.DTYPE_BFLOAT16: 2,
    pb.DTYPE_INT8: 1,
    pb.DTYPE_INT16: 2,
    pb.DTYPE_INT32: 4,
    pb.DTYPE_INT64: 8,
    pb.DTYPE_UINT8: 1,
    pb.DTYPE_BOOL: 1,
    pb.DTYPE_COMPLEX64: 8,
    pb.DTYPE_COMPLEX128: 16,
}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TEXT = ["", "x", "héllo ✓", "\x00", "\U0001f600" * 3, "a" * 300, "__call__", "\ud7ff\ue000"]


def random_tensor(rng: random.Random) -> tuple[pb.Tensor, bool | None]:
    """A tensor and whether the daemon must take it."""
    dtype = rng.choice(list(DTYPE_SIZES))
    shape = [rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.randint(0, 4))]
    data_length = math.prod(shape) * DTYPE_SIZES[dtype]
    data = bytes(data_length) if dtype == pb.DTYPE_BOOL else rng.randbytes(data_length)
    valid: bool | None = True
    flaw = rng.random()
    if flaw < 0.05:
        dtype, valid = rng.choice([0, 13, 99, -1, 2**31 - 1]), False
    elif flaw < 0.10:
        shape, valid = [*shape, rng.choice([-1, -(2**63)])], False
    elif flaw < 0.15:
        data, valid = data + b"\x00" * rng.randint(1, 9), False
    elif flaw < 0.20 and data:
        data, valid = data[: rng.randrange(len(data))], False
    elif flaw < 0.25:
        shape = [*shape, 0, *[rng.choice([2**31, 2**40, 2**62, INT64_MAX]) for _ in range(rng.randint(1, 3))]]
        data, valid = b"", None  # empty but enormous: a limit may refuse it
    elif flaw < 0.28:
        shape, data, valid = [rng.choice([2, 3])] * rng.randint(33, 70), b"", False  # rank over the limit
    tensor = pb.Tensor(shape=shape, data=data)
    tensor.dtype = dtype  # type: ignore[assignment]
    return tensor, valid


def random_value(rng: random.Random, value: pb.Value, depth: int = 0) -> bool | None:
    """Fill value at random; whether the daemon must take it (None: it may go either way).

    Values are built in place: appending a finished deep value would make protobuf parse it.
    """
    kinds = ["none", "bool", "int", "double", "string", "bytes", "tensor", "empty"]
    if depth < 5:
        kinds += ["list", "tuple", "dict"] * 2
    if depth == 0:
        kinds.append("deep")
    kind = rng.choice(kinds)
    valid: bool | None = True
    if kind == "none":
        value.none_value = pb.NONE_VALUE
    elif kind == "bool":
        value.bool_value = rng.random() < 0.5
    elif kind == "int":
        value.int_value = rng.choice([0, -1, INT64_MIN, INT64_MAX, rng.randint(INT64_MIN, INT64_MAX)])
    elif kind == "double":
        value.double_value = rng.choice([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, rng.uniform(-1e300, 1e300)])
    elif kind == "string":
        value.string_value = rng.choice(TEXT)
    elif kind == "bytes":
        value.bytes_value = rng.randbytes(rng.randint(0, 40))
    elif kind == "tensor":
        tensor, valid = random_tensor(rng)
        value.tensor_value.CopyFrom(tensor)
    elif kind == "empty":
        valid = False  # a Value with no kind
    elif kind in ("list", "tuple"):
        items = value.list_value if kind == "list" else value.tuple_value
        items.SetInParent()
        for _ in range(rng.randint(0, 4)):
            valid = combine(valid, random_value(rng, items.items.add(), depth + 1))
    elif kind == "dict":
        value.dict_value.SetInParent()
        for _ in range(rng.randint(0, 4)):
            entry = value.dict_value.entries.add()
            item_valid = random_value(rng, entry.value, depth + 1)
            key_kind = rng.random()
            if key_kind < 0.45:
                entry.string_key = rng.choice(TEXT)
            elif key_kind < 0.9:
                entry.int_key = rng.choice([0, 1, INT64_MIN, INT64_MAX])
            else:
                item_valid = False  # no key
            valid = combine(valid, item_valid)
    elif kind == "deep":
        # Past protobuf's own nesting limit (about 50 lists) the request does not parse at all.
        innermost = value
        for _ in range(rng.choice([10, 30, 45, 48, 49, 50, 60, 65, 100, 200])):
            innermost = innermost.list_value.items.add()
        innermost.int_value = 1
        valid = None
    return valid


def combine(valid: bool | None, item: bool | None) -> bool | None:
    if valid is False or item is False:
        return False
    return None if valid is None or item is None else True


INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80abc"]


def with_invalid_utf8(rng: random.Random, request: pb.InvokeRequest) -> bytes:
    """The request's bytes with a string field that is not UTF-8 (protobuf refuses to parse it)."""
    marker = "\u2603MARK\u2603"  # same byte length as every replacement below, padded
    request.args.append(pb.Value(string_value=marker))
    data = request.SerializeToString()
    encoded = marker.encode()
    bad = rng.choice(INVALID_UTF8)
    return data.replace(encoded, (bad + b"z" * len(encoded))[: len(encoded)], 1)


def test_random_wire_values(target: Target) -> None:
    """Well-formed InvokeRequests of random, often malformed, values at the echo object."""
    test = "test_random_wire_values"
    rng = rng_for(test)
    for number in rounds(FUZZ_SECONDS * 0.3, 20_000):
        request = pb.InvokeRequest(object_id=target.echo_id)
        single = rng.random() < 0.6
        count = 1 if single else rng.randint(0, 3)
        valid: bool | None = True
        for _ in range(count):
            valid = combine(valid, random_value(rng, request.args.add()))
        if not single:
            request.method = "pair"
            for name in rng.sample(TEXT[1:], rng.randint(0, 2)):  # distinct: a second would replace the first
                valid = combine(valid, random_value(rng, request.kwargs[name]))
        if rng.random() < 0.05:
            payload, valid = with_invalid_utf8(rng, request), False
        else:
            payload = request.SerializeToString()
        what = f"Invoke with bytes {payload.hex()}"
        answer = target.call("Invoke", payload)
        if valid is None:
            target.check(answer, {Code.OK, Code.INVALID_ARGUMENT}, what, test)
        elif valid:
            target.check(answer, {Code.OK}, what, test)
            if single and "dict_value" not in str(request.args[0]):  # a repeated key keeps one entry
                result = pb.InvokeResponse.FromString(answer.response).result
                assert result.SerializeToString() == request.args[0].SerializeToString(), (
                    f"{what}: echo changed the value\n  {replay_hint(test)}"
                )
        else:
            target.check(answer, {Code.INVALID_ARGUMENT}, what, test)
        if number % 200 == 199:
            target.assert_serving(f"{number + 1} random values")
    target.assert_serving("random wire values")


# ------------------------------------------------------------------ mutated packages


def rebuild_zip(rng: random.Random, data: bytes) -> bytes:
    """The archive rewritten with one entry changed: its bytes, its name, or gone; or one added."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    index = rng.randrange(len(entries))
    # Most often the parts the daemon and torch.package read: pickles, weights, code, version.
    interesting = [
        i for i, (name, _) in enumerate(entries) if name.endswith((".pkl", ".py", "version")) or "/data/" in name
    ]
    if interesting and rng.random() < 0.7:
        index = rng.choice(interesting)
    name, content = entries[index]
    edit = rng.choice(["mutate", "mutate", "truncate", "delete", "rename", "random", "duplicate", "add", "empty"])
    if edit == "mutate":
        entries[index] = (name, mutate(rng, content, []))
    elif edit == "truncate":
        entries[index] = (name, content[: rng.randint(0, len(content))])
    elif edit == "delete":
        del entries[index]
    elif edit == "rename":
        entries[index] = (mutate(rng, name.encode(), []).decode("utf-8", "replace") or "x", content)
    elif edit == "random":
        entries[index] = (name, rng.randbytes(rng.randint(0, 256)))
    elif edit == "duplicate":
        entries.append((name, rng.randbytes(16)))
    elif edit == "add":
        prefix = name.split("/")[0]
        entries.append((f"{prefix}/.data/{rng.randint(0, 99)}.storage", rng.randbytes(rng.randint(0, 64))))
    elif edit == "empty":
        entries = []
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a duplicate name is wanted here
        for entry_name, entry_content in entries:
            with contextlib.suppress(ValueError, UnicodeError, IndexError):  # a name zipfile refuses
                archive.writestr(entry_name, entry_content)
    return out.getvalue()


def mutated_package(rng: random.Random, archives: dict[str, bytes]) -> tuple[str, bytes]:
    name = rng.choice(sorted(archives))
    data = archives[name]
    how = rng.random()
    if how < 0.5:
        return name, rebuild_zip(rng, data)
    if how < 0.75:
        out = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return name, bytes(out)
    if how < 0.9:
        return name, data[: rng.randint(0, len(data))]
    return name, mutate(rng, data, list(archives.values()))


def chunked(rng: random.Random, data: bytes) -> list[bytes]:
    size = rng.choice([len(data) or 1, 1 << 16, rng.randint(1, 4096)])
    return [pb.LoadPackageRequest(chunk=data[i : i + size]).SerializeToString() for i in range(0, len(data), size)] or [
        pb.LoadPackageRequest(chunk=b"").SerializeToString()
    ]


SERVER_PATHS = ["models.pt", "not_a_package.pt", "../models.pt", "/etc/passwd", "", ".", "..", "\x00", "models.pt\x00"]
SERVER_PATHS += ["a/" * 200, "x" * 300, "/dev/zero", "/proc/self/mem", "../" * 50 + "etc/passwd"]
PICKLES = {"models": ("models", "echo.pkl"), "twin_a": ("twins", "twin.pkl"), "conv": ("model", "model.pkl")}


def try_package(target: Target, rng: random.Random, chunks: list[bytes], base: str, what: str, test: str) -> None:
    """Load the package; when it loads, load its pickle, call it, and unload everything again."""
    answer = target.load_package(chunks)
    target.check(answer, {*PROPER, Code.UNAVAILABLE}, f"LoadPackage {what}", test)
    if answer.code != Code.OK:
        return
    package_id = pb.LoadPackageResponse.FromString(answer.response).package_id
    if package_id in (target.models_id, target.victim_package):
        return  # the mutation changed nothing that counts (or the server_path named a base)
    module, file = PICKLES.get(base, ("models", "echo.pkl"))
    request = pb.LoadPickleRequest(package_id=package_id, module=module, file=file)
    loaded = target.call("LoadPickle", request.SerializeToString())
    target.check(loaded, {*PROPER, Code.UNAVAILABLE}, f"LoadPickle {module}/{file} of {what}", test)
    if loaded.code == Code.OK:
        object_id = pb.LoadPickleResponse.FromString(loaded.response).object_id
        call = pb.InvokeRequest(object_id=object_id, args=[pb.Value(int_value=1)] if base == "models" else [])
        invoked = target.call("Invoke", call.SerializeToString())
        target.check(invoked, {*PROPER, Code.UNAVAILABLE}, f"Invoke of {what}", test)
    resource = pb.LoadResourceRequest(package_id=package_id, module="models", resource="notes.txt")
    target.check(target.call("LoadText", resource.SerializeToString()), PROPER, f"LoadText of {what}", test)
    unloaded = target.call("UnloadPackage", pb.UnloadPackageRequest(package_id=package_id).SerializeToString())
    target.check(unloaded, {Code.OK}, f"UnloadPackage of {what}", test)


def test_mutated_packages(target: Target) -> None:
    """LoadPackage of mutated, truncated and rebuilt archives, then LoadPickle, Invoke, unload."""
    test = "test_mutated_packages"
    rng = rng_for(test)
    archives = {name: (target.package_dir / f"{name}.pt").read_bytes() for name in ("models", "twin_a", "conv")}
    segments_before = target.daemon_segments()
    for number in rounds(FUZZ_SECONDS * 0.45, 5_000):
        kind = rng.random()
        if kind < 0.85:
            base, data = mutated_package(rng, archives)
            try_package(target, rng, chunked(rng, data), base, f"{base} mutated ({len(data)} bytes, seed {SEED})", test)
        elif kind < 0.93:
            path = rng.choice(SERVER_PATHS)
            chunks = [pb.LoadPackageRequest(server_path=path).SerializeToString()]
            if rng.random() < 0.3:
                chunks.append(pb.LoadPackageRequest(chunk=b"x").SerializeToString())
            try_package(target, rng, chunks, "models", f"server_path {path!r} ({len(chunks)} messages)", test)
        else:  # garbage messages in the stream
            good = chunked(rng, archives["twin_a"])
            chunks = [mutate(rng, rng.choice(good), good) for _ in range(rng.randint(0, 4))]
            try_package(target, rng, chunks, "twin_a", f"stream {[chunk.hex() for chunk in chunks]}", test)
        if number % 50 == 49:
            target.assert_serving(f"{number + 1} packages")
    target.assert_serving("mutated packages")
    # Every package that loaded was unloaded: its weights segment must be gone too.
    assert wait_until(lambda: target.daemon_segments() <= segments_before, 10), (
        f"segments left: {target.daemon_segments() - segments_before}\n  {replay_hint(test)}"
    )


def test_a_damaged_weight_record_is_a_bad_zip_and_leaves_no_segment(tmp_path: Path) -> None:
    """Found by the fuzz: a storage record that fails its CRC left its segment behind and the
    caller got INTERNAL (BufferError: the traceback kept a view of the segment exported)."""
    import torch
    from torch.package import PackageExporter

    from server.models.weights import stage_weights

    path = tmp_path / "weights.pt"
    with PackageExporter(str(path)) as exporter:
        exporter.save_pickle("m", "m.pkl", torch.arange(1000, dtype=torch.float32))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(info for info in archive.infolist() if info.filename.endswith(".storage"))
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 100] ^= 0xFF  # inside the record
    path.write_bytes(data)
    before = shm_segments()
    with pytest.raises(zipfile.BadZipFile, match="CRC"):
        stage_weights(str(path))
    assert not {name for name in shm_segments() - before if name.startswith(f"deployd-{os.getpid()}-")}
