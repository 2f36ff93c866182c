"""Fuzz a live daemon: garbage request bytes, random wire values, mutated package archives.

Every answer must be a proper status (never INTERNAL; UNKNOWN only for an exception of
model code, which carries its type), the daemon must stay up and answer a normal call
after each round, and it must end without a leaked worker or /dev/shm segment.

Each test runs on two paths (README "Two paths"): [daemon], the requests to the daemon, and
[data_port], to the workers' own ports of a daemon started with `pool: {data_ports: 0}`.
There a method the port does not serve must answer UNIMPLEMENTED and nothing else, and one
it serves (Invoke, HasAttr) must answer as the daemon does for the same bytes: the same
bytes go to the daemon too, and status, message and error detail must be the same (the
daemon's answer itself held to the rules above). The control plane's requests (loads,
unloads) still go to the daemon, so the ports are fuzzed while what they serve changes.

Bounded in time: DEPLOYD_FUZZ_SECONDS (default 20, shared by the three tests and their two
paths: PATHS; `make fuzz` runs 300). Each test's random generator is seeded from
DEPLOYD_FUZZ_SEED (random when unset): a failure prints the seed, and the same seed replays
the same inputs.
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import random
import re
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
from deployd_wire.proto import deployd_pb2 as pb
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
# The paths a fuzz test runs on (its parameter), each with its share of the test's time.
PATHS = {"daemon": 0.6, "data_port": 0.4}
# What a worker's data port serves of deployd.v1.Deployd; the rest is UNIMPLEMENTED there.
DATA_PORT_METHODS = frozenset({"Invoke", "HasAttr"})
# Methods a data port never serves, besides the Deployd ones of base_requests: random bytes
# to any of them must get UNIMPLEMENTED (and no method name is special there).
NOT_ON_A_DATA_PORT = [
    *(
        f"/deployd.v1.{service.name}/{method.name}"
        for service in pb.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ),
    "/deployd.v1.Deployd/NoSuchMethod",
    "/inference.GRPCInferenceService/RepositoryIndex",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
    "/grpc.health.v1.Health/Check",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/",
    "/x/y",
]
NOT_ON_A_DATA_PORT = [name for name in NOT_ON_A_DATA_PORT if name not in {SERVICE + m for m in DATA_PORT_METHODS}]


def rng_for(test: str) -> random.Random:
    return random.Random(SEED ^ zlib.crc32(test.encode()))


def path_rng(test: str, path: str) -> random.Random:
    """A test's generator on a path: the daemon path's as before the paths were two (a seed replays)."""
    return rng_for(test if path == "daemon" else f"{test}[{path}]")


def replay_hint(test: str) -> str:
    return f"replay: DEPLOYD_FUZZ_SEED={SEED} DEPLOYD_FUZZ_SECONDS={FUZZ_SECONDS:g} pytest tests/test_fuzz.py::{test}"


_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_CALL_ID = re.compile(r"call id [0-9a-f]+")  # each call's own: the id its whole traceback is logged under


def _comparable(text: str) -> str:
    return _CALL_ID.sub("call id", _ADDRESS.sub("0x", text))


def same_answers(port: Answer, daemon: Answer) -> bool:
    """A data port's answer is the daemon's: status, message, error detail (object addresses and
    call ids aside).

    Where a worker died under the call the two paths' messages differ (the daemon names the
    exit, the port's caller loses the connection): then the status alone must be the same."""
    if port.code != daemon.code:
        return False
    if port.code == Code.UNAVAILABLE:
        return True
    return (
        _comparable(port.details) == _comparable(daemon.details)
        and port.remote_type == daemon.remote_type
        and port.call_killed_worker == daemon.call_killed_worker
        and _comparable(port.remote_traceback) == _comparable(daemon.remote_traceback)
    )


def data_port_addresses(daemon: DaemonProcess, workers: int) -> list[str]:
    """The workers' data ports as the daemon lists them (deployd.v1 Endpoints), once all serve."""
    found: list[str] = []

    def listed() -> bool:
        with grpc.insecure_channel(daemon.target) as channel:
            endpoints = channel.unary_unary(SERVICE + "Endpoints")(
                pb.EndpointsRequest().SerializeToString(), timeout=30
            )
        found[:] = sorted(worker.address for worker in pb.EndpointsResponse.FromString(endpoints).workers)
        return len(found) == workers and all(found)

    assert wait_until(listed, 60), f"the daemon lists the data ports {found}, not {workers}"
    return found


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    response: bytes
    remote_type: str = ""
    remote_traceback: str = ""
    call_killed_worker: bool = False

    def __str__(self) -> str:
        return f"{self.code.name} {self.details!r}" + (f" (remote {self.remote_type})" if self.remote_type else "")


def answer_of(call: Callable[[], bytes]) -> Answer:
    try:
        return Answer(Code.OK, "", call())
    except grpc.RpcError as error:
        detail = pb.ErrorDetail()
        for key, value in error.trailing_metadata() or ():
            if key == ERROR_DETAIL_KEY:
                detail = pb.ErrorDetail.FromString(value)
        return Answer(
            error.code(),
            error.details() or "",
            b"",
            detail.remote_type,
            detail.remote_traceback,
            detail.call_killed_worker,
        )


@dataclass
class Target:
    """The daemon under fuzz, a raw channel to it (bytes in, bytes out) and the objects fuzzed at;
    on the data_port path also raw channels to its workers' data ports, taken in turn."""

    daemon: DaemonProcess
    package_dir: Path
    channel: grpc.Channel
    manager: InterpreterManager
    path: str = "daemon"
    port_channels: list[grpc.Channel] = field(default_factory=list, repr=False)
    echo_id: str = ""
    models_id: str = ""
    victim_object: str = ""
    victim_package: str = ""
    workers: int = 0
    log: list[str] = field(default_factory=list, repr=False)
    port_codes: collections.Counter[str] = field(default_factory=collections.Counter)  # the ports' answers
    _turn: int = 0

    def call(self, method: str, payload: bytes) -> Answer:
        """Through the daemon."""
        rpc = self.channel.unary_unary(SERVICE + method)
        return answer_of(lambda: rpc(payload, timeout=CALL_TIMEOUT))

    def load_package(self, chunks: list[bytes], channel: grpc.Channel | None = None) -> Answer:
        """Through the daemon, or channel's (a data port's)."""
        rpc = (channel or self.channel).stream_unary(SERVICE + "LoadPackage")
        answer = answer_of(lambda: rpc(iter(chunks), timeout=CALL_TIMEOUT))
        if channel is not None:
            self.port_codes[f"LoadPackage stream {answer.code.name}"] += 1
        return answer

    def next_port(self) -> grpc.Channel:
        """The data ports in turn (the same seed, the same port for each request)."""
        self._turn += 1
        return self.port_channels[self._turn % len(self.port_channels)]

    def call_port(self, method: str, payload: bytes, channel: grpc.Channel | None = None) -> Answer:
        """To a worker's data port (the next one, or channel's); method: a Deployd method's name,
        or a full "/service/method"."""
        rpc = (channel or self.next_port()).unary_unary(method if method.startswith("/") else SERVICE + method)
        answer = answer_of(lambda: rpc(payload, timeout=CALL_TIMEOUT))
        self.port_codes[f"{method} {answer.code.name}"] += 1
        return answer

    def seconds(self, share: float) -> float:
        """This test's time on this path: its share of DEPLOYD_FUZZ_SECONDS, times the path's."""
        return FUZZ_SECONDS * share * PATHS[self.path]

    def test_id(self, test: str) -> str:
        return f"{test}[{self.path}]"

    def fuzz(self, method: str, payload: bytes, allowed: set[grpc.StatusCode], what: str, test: str) -> Answer:
        """Send payload as method's request on this test's path and check the answer; the daemon's
        answer, which the caller may act on. On a data port a method it serves must answer as
        the daemon (sent the same bytes), any other UNIMPLEMENTED (the daemon answers it then)."""
        if self.path == "daemon":
            answer = self.call(method, payload)
            self.check(answer, allowed, what, test)
            return answer
        port = self.call_port(method, payload)
        answer = self.call(method, payload)
        if method in DATA_PORT_METHODS:
            self.check_same(port, answer, allowed, what, test)
        else:
            self.check(port, {Code.UNIMPLEMENTED}, f"{what} on a data port", test)
            self.check(answer, allowed, what, test)
        return answer

    def check_same(self, port: Answer, daemon: Answer, allowed: set[grpc.StatusCode], what: str, test: str) -> None:
        """The daemon's answer is proper and the data port's the same, word for word."""
        self.check(daemon, allowed, f"{what} (through the daemon)", test)
        self.log.append(f"{what} on a data port: {port}")
        assert same_answers(port, daemon), (
            f"{what}\n  a data port answered {port}\n  the daemon answered {daemon}"
            + (
                f"\n  tracebacks:\n{port.remote_traceback}\n  vs\n{daemon.remote_traceback}"
                if port.remote_traceback != daemon.remote_traceback
                else ""
            )
            + f"\n  {replay_hint(test)}"
        )

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
        for channel in self.port_channels:  # each data port's worker serves too
            answer = self.call_port("Invoke", request.SerializeToString(), channel)
            assert answer.code == Code.OK, f"a normal call to a data port failed after {context}: {answer}"
            assert pb.InvokeResponse.FromString(answer.response).result.string_value == "still here", context
        assert wait_until(lambda: len(descendants_of(self.daemon.pid)) == self.workers, 30), (
            f"{context}: the daemon has {len(descendants_of(self.daemon.pid))} descendants, {self.workers} at the start"
        )

    def check(self, answer: Answer, allowed: set[grpc.StatusCode], what: str, test: str) -> None:
        self.log.append(f"{what}: {answer}")
        proper = answer.code in allowed and (answer.code != Code.UNKNOWN or answer.remote_type)
        assert proper, f"{what}\n  got {answer}\n  {replay_hint(test)}"

    def daemon_segments(self) -> set[str]:
        return {name for name in shm_segments() if name.startswith(f"deployd-{self.daemon.pid}-")}


@pytest.fixture(scope="module", params=list(PATHS))
def target(
    request: pytest.FixtureRequest, package_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    path = request.param
    sections: dict[str, dict[str, object]] = {"pool": {"data_ports": 0}} if path == "data_port" else {}
    config = write_config(tmp_path_factory.mktemp("fuzz") / "config.yaml", package_dir, **sections)
    daemon = DaemonProcess(config).start()
    print(f"fuzz seed {SEED}, {FUZZ_SECONDS:g} s, {path} path")
    ports: list[grpc.Channel] = []
    try:
        channel = grpc.insecure_channel(daemon.target)
        # direct=False: the fuzz's own loads and checks go to the daemon; the ports get raw channels.
        with InterpreterManager(daemon.target, timeout=CALL_TIMEOUT, direct=False) as manager:
            if path == "data_port":
                ports = [grpc.insecure_channel(address) for address in data_port_addresses(daemon, 2)]
            fuzzed = Target(daemon, package_dir, channel, manager, path, ports)
            fuzzed.reload()
            fuzzed.workers = len(descendants_of(daemon.pid))
            yield fuzzed
            fuzzed.assert_serving("the last test")
            if fuzzed.port_codes:
                print(f"data ports' answers: {dict(sorted(fuzzed.port_codes.items()))}")
        channel.close()
    finally:
        for port in ports:
            port.close()
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
    """Random and mutated bytes as the request of every unary method (on a data port, also of
    methods it never serves)."""
    test = target.test_id("test_garbage_request_bytes")
    rng = path_rng("test_garbage_request_bytes", target.path)
    bases = base_requests(target)
    every_base = [request for requests in bases.values() for request in requests]
    for number in rounds(target.seconds(0.25), 20_000):
        if target.path == "data_port" and rng.random() < 0.1:
            method = rng.choice(NOT_ON_A_DATA_PORT)
            payload = rng.choice([b"", rng.randbytes(rng.randint(0, 64)), rng.choice(every_base)])
            answer = target.call_port(method, payload)
            target.check(answer, {Code.UNIMPLEMENTED}, f"{method} with bytes {payload.hex()} on a data port", test)
            continue
        method = rng.choice(sorted(bases))
        if rng.random() < 0.15:
            payload = rng.randbytes(rng.randint(0, 64))
        else:
            payload = mutate(rng, rng.choice(bases[method]), every_base)
        answer = target.fuzz(method, payload, PROPER, f"{method} with bytes {payload.hex()}", test)
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
    """Well-formed InvokeRequests of random, often malformed, values at the echo object. On a
    data port each answer is held to the same rules, and where they allow more than one
    answer, or it is a refusal, the daemon's answer to the same bytes must be the same."""
    test = target.test_id("test_random_wire_values")
    rng = path_rng("test_random_wire_values", target.path)
    for number in rounds(target.seconds(0.3), 20_000):
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
        if target.path == "daemon":
            answer = target.call("Invoke", payload)
        else:
            what += " on a data port"
            answer = target.call_port("Invoke", payload)
            if valid is None or answer.code != Code.OK:
                target.check_same(answer, target.call("Invoke", payload), PROPER, what, test)
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
    """Load the package; when it loads, load its pickle, call it, and unload everything again.
    On the data_port path the package goes to a port too (UNIMPLEMENTED), the calls to a port
    and the daemon."""
    if target.path == "data_port":
        refused = target.load_package(chunks, target.next_port())
        target.check(refused, {Code.UNIMPLEMENTED}, f"LoadPackage {what} on a data port", test)
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
        target.fuzz("Invoke", call.SerializeToString(), {*PROPER, Code.UNAVAILABLE}, f"Invoke of {what}", test)
        if target.path == "data_port":
            has = pb.HasAttrRequest(object_id=object_id, name="__call__").SerializeToString()
            target.fuzz("HasAttr", has, {*PROPER, Code.UNAVAILABLE}, f"HasAttr of {what}", test)
    resource = pb.LoadResourceRequest(package_id=package_id, module="models", resource="notes.txt")
    target.check(target.call("LoadText", resource.SerializeToString()), PROPER, f"LoadText of {what}", test)
    unloaded = target.call("UnloadPackage", pb.UnloadPackageRequest(package_id=package_id).SerializeToString())
    target.check(unloaded, {Code.OK}, f"UnloadPackage of {what}", test)


def test_mutated_packages(target: Target) -> None:
    """LoadPackage of mutated, truncated and rebuilt archives, then LoadPickle, Invoke, unload."""
    test = target.test_id("test_mutated_packages")
    rng = path_rng("test_mutated_packages", target.path)
    archives = {name: (target.package_dir / f"{name}.pt").read_bytes() for name in ("models", "twin_a", "conv")}
    segments_before = target.daemon_segments()
    for number in rounds(target.seconds(0.45), 5_000):
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


# ------------------------------------------------------------------ found by the fuzz


def _kwargs_names(value: pb.Value) -> list[str]:
    """The string keys of the dicts in a result, in its order."""
    if value.HasField("dict_value"):
        return [entry.string_key for entry in value.dict_value.entries]
    items = value.tuple_value.items if value.HasField("tuple_value") else value.list_value.items
    return [name for item in items for name in _kwargs_names(item)]


@pytest.mark.parametrize("target", ["data_port"], indirect=True)
def test_kwargs_meet_the_model_in_one_order(target: Target) -> None:
    """Found by the fuzz (test_random_wire_values[data_port], DEPLOYD_FUZZ_SEED=4236632620): one
    request, two bad kwargs, a data port's INVALID_ARGUMENT names one and the daemon's the other.
    The same bytes must meet the model the same way on every path: kwargs in one order, and of
    bad ones the same named."""
    names = [f"k{i:02d}" for i in range(16)]
    request = pb.InvokeRequest(object_id=target.echo_id, method="pair")
    for i, name in enumerate(names):
        request.kwargs[name].int_value = i
    payload = request.SerializeToString()
    orders = {"the daemon": target.call("Invoke", payload)}
    for number, channel in enumerate(target.port_channels):
        orders[f"data port {number}"] = target.call_port("Invoke", payload, channel)
    assert all(answer.code == Code.OK for answer in orders.values()), orders
    seen = {where: _kwargs_names(pb.InvokeResponse.FromString(a.response).result) for where, a in orders.items()}
    assert all(sorted(order) == names for order in seen.values()), seen
    bad = pb.InvokeRequest(object_id=target.echo_id, method="pair")
    for i, name in enumerate(names):  # each a tensor of an unknown dtype: the message names it
        bad.kwargs[name].tensor_value.dtype = 100 + i  # type: ignore[assignment]
    refused = {"the daemon": target.call("Invoke", bad.SerializeToString())}
    for number, channel in enumerate(target.port_channels):
        refused[f"data port {number}"] = target.call_port("Invoke", bad.SerializeToString(), channel)
    assert all(answer.code == Code.INVALID_ARGUMENT for answer in refused.values()), refused
    assert len({answer.details for answer in refused.values()}) == 1, {w: a.details for w, a in refused.items()}
    assert len({tuple(order) for order in seen.values()}) == 1, seen


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
