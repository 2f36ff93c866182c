"""Fuzz a live daemon's KServe v2 endpoint (`inference.GRPCInferenceService`): random
ModelInferRequests, and mutated bytes of valid requests of every read-only v2 method.

Every answer must be a proper status: OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED (only
where the model is called: an overloaded pool), or UNKNOWN with the model's exception attached;
never INTERNAL, UNAVAILABLE or DEADLINE_EXCEEDED. More than that: an oracle written from the
README's rules ("Any language") predicts each answer from the request alone (a request that
does not parse, a bad name or version, a bad input, what echo, many, declared and scaled give
back and how a result becomes outputs), and an OK answer must carry exactly the predicted
outputs: echo's output is its input, bytes and shape. After the rounds the daemon must still
answer tritonclient, have its workers, and stop with no leaked process or /dev/shm segment.

Each test runs on two paths, as in tests/test_fuzz.py: [daemon], and [data_port], the requests
to the workers' own ports of a daemon started with `pool: {data_ports: 0}`. A port must answer
as the rules say, except RepositoryIndex, which it does not serve: UNIMPLEMENTED. Where the
rules allow more than one status, and for every refusal, the daemon is sent the same bytes and
its answer (status, message, error detail) must be the port's.

Bounded in time by DEPLOYD_FUZZ_SECONDS (default 10 here, shared by the two fuzz tests and their
two paths) and in count; seeded from DEPLOYD_FUZZ_SEED like tests/test_fuzz.py (random when
unset): a failure prints the seed, and the same seed replays the same requests.

Bugs the fuzz found are kept as tests (the section "Found by the fuzz"), all fixed: the fuzz
tolerates no answer but a proper one.

RepositoryModelLoad and RepositoryModelUnload are left out: they change what is loaded, which
the oracle takes as fixed (tests/test_kserve_v2.py covers them).

The v2 messages are tritonclient's (`tritonclient.grpc.service_pb2`), never deployd_wire/proto's:
both register the protobuf package `inference` and one process's descriptor pool refuses two.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2 as v2

from server.pool.procinfo import descendants_of
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, shm_segments, wait_until
from tests.test_fuzz import (
    CALL_TIMEOUT,
    PATHS,
    SEED,
    Answer,
    answer_of,
    data_port_addresses,
    mutate,
    path_rng,
    rounds,
    same_answers,
)
from tests.v2_models import DECLARED, ECHO, MANY, SCALED

FUZZ_SECONDS = float(os.environ.get("DEPLOYD_FUZZ_SECONDS", "10"))
SERVICE = "/inference.GRPCInferenceService/"
Code = grpc.StatusCode
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MESSAGE_LIMIT = 64 * 1024 * 1024  # the raw channel's: echo of several big tensors is over grpc's 4 MiB
# What a worker's data port serves of the v2 service (the fuzzed methods but RepositoryIndex).
DATA_PORT_METHODS = frozenset(
    {"ModelInfer", "ModelReady", "ModelMetadata", "ServerLive", "ServerReady", "ServerMetadata"}
)

MODELS: list[dict[str, Any]] = [
    ECHO,
    MANY,
    DECLARED,
    SCALED,
    {"name": "seed", "package": "conv.pt", "pickle": "model:model.pkl"},
]
BY_MODEL = {model["name"]: model for model in MODELS}


def replay_hint(test: str) -> str:
    return (
        f"replay: DEPLOYD_FUZZ_SEED={SEED} DEPLOYD_FUZZ_SECONDS={FUZZ_SECONDS:g} pytest tests/test_fuzz_v2.py::{test}"
    )


# ------------------------------------------------------------------ the rules (README "Any language")

SIZES = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
}
SUPPORTED = [*SIZES, "BYTES"]
# datatype -> typed contents field, struct format of one element, and the range a value must fit
TYPED: dict[str, tuple[str, str, tuple[int, int] | None]] = {
    "BOOL": ("bool_contents", "?", None),
    "UINT8": ("uint_contents", "B", (0, 255)),
    "INT8": ("int_contents", "b", (-128, 127)),
    "INT16": ("int_contents", "h", (-32768, 32767)),
    "INT32": ("int_contents", "i", None),
    "INT64": ("int64_contents", "q", None),
    "FP32": ("fp32_contents", "f", None),
    "FP64": ("fp64_contents", "d", None),
    "BYTES": ("bytes_contents", "", None),
}
FIELDS = [
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
]
MAX_RANK = 32  # limits.max_tensor_rank
MAX_ELEMENTS = 1 << 31  # limits.max_tensor_elements
MAX_BYTES_ITEMS = 1 << 20  # limits.max_container_items, for BYTES
NO_TYPED_FIELD = ("FP16", "BF16")
VERSION_DIGITS_LIMIT = 4300  # Python's int() of a longer string of digits raises ValueError


class Tensor(NamedTuple):
    """A numeric tensor as the model sees it: what its bytes are."""

    datatype: str
    shape: tuple[int, ...]
    data: bytes


class Out(NamedTuple):
    name: str
    datatype: str
    shape: list[int]
    data: Any  # bytes, or a list of bytes (BYTES)
    nan_equal: bool = False  # computed floats: any NaN matches any NaN


class Flaw(Exception):
    """The request is bad: INVALID_ARGUMENT."""


class NoTensorForm(Exception):
    """The result has no v2 form: INVALID_ARGUMENT."""


@dataclass
class Expect:
    """What an answer may be. An OK answer must hold `outputs` (when given) or pass `check`."""

    codes: set[grpc.StatusCode]
    outputs: list[Out] | None = None
    raw: bool = False
    remote: str = ""  # for UNKNOWN: the exception type the model raised ("" any)
    check: Callable[[bytes], None] | None = None


LONG_NAME = "n" * 20_000


def parse_version(text: str) -> int | None:
    """Empty: 0 (the serving version); a positive decimal number; None: not a version."""
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()) or not text.strip("0"):
        return None
    if len(text) > 18:
        return None  # versions count up from 1: more than 18 digits is no version
    return int(text)


def elements_of(shape: list[int]) -> int:
    return math.prod(shape)


def parse_bytes(data: bytes) -> list[bytes] | None:
    """Length-prefixed BYTES elements, or None if the data is not exactly such elements."""
    items, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            return None
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            return None
        items.append(data[offset : offset + length])
        offset += length
    return items


def encode_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


class EmptyLists:
    """BYTES of shape [n > 0, ..., 0, ...]: n lists of (lists of) empty lists. Not built: n may be
    2**62. Whatever way the daemon handles it, it has no tensor form."""


def nest(items: list[bytes], shape: list[int]) -> Any:
    """BYTES as the model gets it: one element is bytes, more a list nested by shape."""
    if len(items) == 1:
        return items[0]
    if not items and 0 in shape[1:] and shape[0] > 0:
        return EmptyLists()

    def build(flat: list[bytes], dims: list[int]) -> list[Any]:
        if len(dims) <= 1:
            return flat
        size = math.prod(dims[1:])
        return [build(flat[i * size : (i + 1) * size], dims[1:]) for i in range(dims[0])]

    return build(items, shape)


def decode_input(tensor: Any, name: str, raw: bytes | None, spec: dict[str, Any] | None) -> Any:
    """The value the model gets for one input; Flaw if the input is bad."""
    datatype, shape = tensor.datatype, list(tensor.shape)
    if datatype not in SUPPORTED:
        raise Flaw(f"{name}: datatype {datatype!r}")
    if spec is not None and (
        datatype != spec["datatype"]
        or len(shape) != len(spec["shape"])
        or any(want not in (-1, got) for want, got in zip(spec["shape"], shape, strict=True))
    ):
        raise Flaw(f"{name}: not as declared")
    if len(shape) > MAX_RANK or any(size < 0 for size in shape):
        raise Flaw(f"{name}: rank or negative size")
    if math.prod(max(size, 1) for size in shape) * SIZES.get(datatype, 1) > INT64_MAX:
        raise Flaw(f"{name}: sizes overflow int64")
    elements = elements_of(shape)
    if elements > (MAX_BYTES_ITEMS if datatype == "BYTES" else MAX_ELEMENTS):
        raise Flaw(f"{name}: too many elements")
    if datatype == "BYTES" and math.prod(shape[:-1]) > MAX_BYTES_ITEMS:
        raise Flaw(f"{name}: too many nested lists")
    if raw is not None:
        if tensor.HasField("contents"):
            raise Flaw(f"{name}: contents and raw contents")
        if datatype == "BYTES":
            items = parse_bytes(raw)
            if items is None or len(items) != elements:
                raise Flaw(f"{name}: BYTES data")
        elif len(raw) != elements * SIZES[datatype]:
            raise Flaw(f"{name}: raw size")
        else:
            return Tensor(datatype, tuple(shape), raw)
    else:
        if datatype not in TYPED:
            raise Flaw(f"{name}: no typed field")
        field_name, fmt, bounds = TYPED[datatype]
        values = list(getattr(tensor.contents, field_name))
        if len(values) != elements:
            raise Flaw(f"{name}: typed count")
        if datatype != "BYTES":
            if bounds is not None and any(not bounds[0] <= value <= bounds[1] for value in values):
                raise Flaw(f"{name}: typed value out of range")
            return Tensor(datatype, tuple(shape), struct.pack(f"<{len(values)}{fmt}", *values))
        items = values
    return nest(items, shape)


def decode_request(request: Any, declared: list[dict[str, Any]]) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword arguments; Flaw if the request is bad."""
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise Flaw("raw_input_contents count")
    specs = {spec["name"]: spec for spec in declared}
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for position, tensor in enumerate(request.inputs):
        name = tensor.name or f"input{position}"
        if declared and (name not in specs or name in kwargs):
            raise Flaw(f"{name}: undeclared or twice")
        value = decode_input(tensor, name, raws[position] if raws else None, specs.get(name))
        if declared:
            kwargs[name] = value
        else:
            args.append(value)
    if any(name not in kwargs for name in specs):
        raise Flaw("missing input")
    return args, kwargs


def leaf(name: str, value: Any) -> Out:
    if isinstance(value, Tensor):
        return Out(name, value.datatype, list(value.shape), value.data)
    if type(value) is bytes:
        return Out(name, "BYTES", [1], [value])
    if type(value) is list and value and all(type(item) is bytes for item in value):
        return Out(name, "BYTES", [len(value)], value)
    raise NoTensorForm(name)


def outputs_of(result: Any, names: list[str]) -> list[Out]:
    if type(result) is dict:
        return [leaf(str(key), value) for key, value in result.items()]
    if type(result) is tuple or (type(result) is list and not (result and all(type(i) is bytes for i in result))):
        return [leaf(names[i] if i < len(names) else f"output{i}", item) for i, item in enumerate(result)]
    return [leaf(names[0] if names else "output0", result)]


def doubled(x: Tensor) -> Tensor:
    with np.errstate(all="ignore"):  # overflow to inf, NaN in: as torch computes it
        values = np.frombuffer(x.data, dtype="<f4") * np.float32(2)
    return Tensor("FP32", x.shape, values.astype("<f4").tobytes())


def predict_infer(request: Any) -> Expect:
    name = request.model_name
    if not name:
        return Expect({Code.INVALID_ARGUMENT})
    # The name is looked up before the version is read: a name not loaded is NOT_FOUND whatever
    # the version (an object id too: v2 serves names).
    model = BY_MODEL.get(name)
    if model is None:
        return Expect({Code.NOT_FOUND})
    version = parse_version(request.model_version)
    if version is None:
        return Expect({Code.INVALID_ARGUMENT})
    declared = model.get("inputs", []) if model else []
    try:
        args, kwargs = decode_request(request, declared)
    except Flaw:
        return Expect({Code.INVALID_ARGUMENT})
    if version not in (0, 1):  # every model serves its version 1
        return Expect({Code.NOT_FOUND})
    answers: set[grpc.StatusCode] = {Code.RESOURCE_EXHAUSTED}  # an overloaded pool may refuse any call
    if name == "seed":  # a conv net: many inputs make torch raise; an answer is an FP32 tensor
        answers |= {Code.UNKNOWN}
        known_outputs = all(out.name == "output0" for out in request.outputs)
        answers |= {Code.OK} if known_outputs else {Code.INVALID_ARGUMENT}
        if any(isinstance(arg, EmptyLists) for arg in args):
            answers |= {Code.INVALID_ARGUMENT}  # it may be refused as too many lists
        return Expect(answers, check=_seed_check(request))
    if name == "echo":
        if len(args) != 1:
            return Expect({Code.UNKNOWN, *answers}, remote="TypeError")
        result: Any = args[0]
    elif name == "scaled":
        result = doubled(kwargs["x"])
    elif kwargs:  # many, and declared (many with declared inputs)
        result = kwargs
    else:
        result = None if not args else args[0] if len(args) == 1 else tuple(args)
    try:
        outputs = outputs_of(result, [spec["name"] for spec in model.get("outputs", [])])
    except NoTensorForm:
        return Expect({Code.INVALID_ARGUMENT, *answers})
    if name == "scaled":
        outputs = [out._replace(nan_equal=True) for out in outputs]
    requested = [output.name for output in request.outputs]
    if requested:
        by_name = {out.name: out for out in outputs}
        if any(wanted not in by_name for wanted in requested):
            return Expect({Code.INVALID_ARGUMENT, *answers})
        outputs = [by_name[wanted] for wanted in requested]
    raw = bool(request.raw_input_contents) or any(out.datatype in NO_TYPED_FIELD for out in outputs)
    return Expect({Code.OK, *answers}, outputs=outputs, raw=raw)


def _seed_check(request: Any) -> Callable[[bytes], None]:
    names = [out.name for out in request.outputs] or ["output0"]  # a name asked twice comes twice

    def check(data: bytes) -> None:
        response = v2.ModelInferResponse.FromString(data)
        got = [(out.name, out.datatype, len(out.shape) in (3, 4)) for out in response.outputs]
        assert got == [(name, "FP32", True) for name in names], response  # conv2d: [N,] C, H, W
        assert (response.model_name, response.model_version, response.id) == ("seed", "1", request.id)

    return check


def output_data(response: Any, index: int, datatype: str, raw: bool) -> Any:
    """An output's data from the answer: bytes, or a list of bytes (BYTES)."""
    if raw:
        data = response.raw_output_contents[index]
        return parse_bytes(data) if datatype == "BYTES" else data
    contents = response.outputs[index].contents
    field_name, fmt, _ = TYPED[datatype]
    values = list(getattr(contents, field_name))
    return values if datatype == "BYTES" else struct.pack(f"<{len(values)}{fmt}", *values)


def same_data(out: Out, got: Any) -> bool:
    if got == out.data:
        return True
    if out.nan_equal and isinstance(got, bytes) and len(got) == len(out.data):
        dtype = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}[out.datatype]
        return bool(np.array_equal(np.frombuffer(got, dtype), np.frombuffer(out.data, dtype), equal_nan=True))
    return False


def check_infer_answer(request: Any, expect: Expect, data: bytes) -> None:
    if expect.check is not None:
        expect.check(data)
    if expect.outputs is None:
        return
    response = v2.ModelInferResponse.FromString(data)
    assert (response.model_name, response.model_version, response.id) == (request.model_name, "1", request.id)
    got = [(out.name, out.datatype, list(out.shape)) for out in response.outputs]
    assert got == [(out.name, out.datatype, out.shape) for out in expect.outputs], "outputs"
    assert len(response.raw_output_contents) == (len(expect.outputs) if expect.raw else 0), "raw or typed"
    for index, out in enumerate(expect.outputs):
        got_data = output_data(response, index, out.datatype, expect.raw)
        assert same_data(out, got_data), f"{out.name}: got {_short(got_data)}, want {_short(out.data)}"


def _short(data: Any) -> str:
    text = data.hex() if isinstance(data, bytes) else repr(data)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(data)} long)"


def predict_ready(request: Any) -> Expect:
    version = parse_version(request.version)
    if version is None:
        return Expect({Code.INVALID_ARGUMENT})
    ready = request.name in BY_MODEL and version in (0, 1)

    def check(data: bytes) -> None:
        assert v2.ModelReadyResponse.FromString(data).ready == ready, f"ready should be {ready}"

    return Expect({Code.OK}, check=check)


def predict_metadata(request: Any) -> Expect:
    if not request.name:
        return Expect({Code.INVALID_ARGUMENT})
    if parse_version(request.version) is None:
        return Expect({Code.INVALID_ARGUMENT})
    if request.name not in BY_MODEL or parse_version(request.version) not in (0, 1):
        return Expect({Code.NOT_FOUND})
    model = BY_MODEL[request.name]

    def check(data: bytes) -> None:
        response = v2.ModelMetadataResponse.FromString(data)
        assert (response.name, list(response.versions), response.platform) == (
            model["name"],
            ["1"],
            "pytorch_torch_package",
        )
        if "inputs" in model:
            got = [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in response.inputs]
            assert got == model["inputs"]

    return Expect({Code.OK}, check=check)


def _check_index(data: bytes) -> None:
    models = v2.RepositoryIndexResponse.FromString(data).models
    assert sorted((m.name, m.version, m.state) for m in models) == sorted((name, "1", "READY") for name in BY_MODEL)


def _check_live(data: bytes) -> None:
    assert v2.ServerLiveResponse.FromString(data).live


def _check_ready(data: bytes) -> None:
    assert v2.ServerReadyResponse.FromString(data).ready


def _check_server_metadata(data: bytes) -> None:
    assert v2.ServerMetadataResponse.FromString(data).name == "deployd"


# method -> its request type and what it must answer
METHODS: dict[str, tuple[type[Message], Callable[[Any], Expect]]] = {
    "ModelInfer": (v2.ModelInferRequest, predict_infer),
    "ModelReady": (v2.ModelReadyRequest, predict_ready),
    "ModelMetadata": (v2.ModelMetadataRequest, predict_metadata),
    "RepositoryIndex": (v2.RepositoryIndexRequest, lambda _: Expect({Code.OK}, check=_check_index)),
    "ServerLive": (v2.ServerLiveRequest, lambda _: Expect({Code.OK}, check=_check_live)),
    "ServerReady": (v2.ServerReadyRequest, lambda _: Expect({Code.OK}, check=_check_ready)),
    "ServerMetadata": (v2.ServerMetadataRequest, lambda _: Expect({Code.OK}, check=_check_server_metadata)),
}


def predict(method: str, payload: bytes) -> tuple[Any, Expect]:
    """The request the daemon will parse from payload (None if it does not parse), and what it must answer."""
    message_type, predictor = METHODS[method]
    try:
        request = message_type.FromString(payload)
    except DecodeError:
        return None, Expect({Code.INVALID_ARGUMENT})
    return request, predictor(request)


# ------------------------------------------------------------------ the daemon under fuzz


@dataclass
class _Context:
    """A failure's words, made only when a failure message is."""

    what: str | Callable[[], str]
    answer: Answer
    test: str

    def __str__(self) -> str:
        what = self.what if isinstance(self.what, str) else self.what()
        return f"{what}\n  got {self.answer}\n  {replay_hint(self.test)}"


@dataclass
class Target:
    """The daemon under fuzz; on the data_port path also its workers' data ports, taken in turn,
    where the requests go (call) and tritonclients of them."""

    daemon: DaemonProcess
    channel: grpc.Channel
    client: triton.InferenceServerClient
    pool_workers: int
    path: str = "daemon"
    port_channels: list[grpc.Channel] = field(default_factory=list, repr=False)
    port_clients: list[triton.InferenceServerClient] = field(default_factory=list, repr=False)
    descendants: int = 0  # the fork server and the workers
    segments: int = 0  # the daemon's /dev/shm segments at the start (weights)
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    _turn: int = 0

    def call(self, method: str, payload: bytes) -> Answer:
        """On this test's path: the daemon, or a data port (in turn)."""
        if self.path == "daemon":
            return self.daemon_call(method, payload)
        self._turn += 1
        rpc = self.port_channels[self._turn % len(self.port_channels)].unary_unary(SERVICE + method)
        return answer_of(lambda: rpc(payload, timeout=CALL_TIMEOUT))

    def daemon_call(self, method: str, payload: bytes) -> Answer:
        rpc = self.channel.unary_unary(SERVICE + method)
        return answer_of(lambda: rpc(payload, timeout=CALL_TIMEOUT))

    def seconds(self, share: float) -> float:
        """This test's time on this path: its share of DEPLOYD_FUZZ_SECONDS, times the path's."""
        return FUZZ_SECONDS * share * PATHS[self.path]

    def test_id(self, test: str) -> str:
        return f"{test}[{self.path}]"

    def send(self, method: str, payload: bytes, what: str | Callable[[], str], test: str) -> None:
        """Send payload, and check the answer against what the rules predict. what: the request
        in words for a failure (a function: words cost time, and only a failure needs them).
        On a data port, a method it does not serve must answer UNIMPLEMENTED; for one it serves,
        where the rules allow more than one status, or the answer is a refusal, the daemon's
        answer to the same bytes must be the same."""
        request, expect = predict(method, payload)
        on_port = self.path == "data_port"
        if on_port and method not in DATA_PORT_METHODS:
            expect = Expect({Code.UNIMPLEMENTED})
        answer = self.call(method, payload)
        self.codes[f"{method} {answer.code.name}"] += 1
        context = _Context(what, answer, test)
        undetermined = len(expect.codes - {Code.RESOURCE_EXHAUSTED}) > 1
        if on_port and method in DATA_PORT_METHODS and (answer.code != Code.OK or undetermined):
            self.codes["compared with the daemon"] += 1
            daemon = self.daemon_call(method, payload)
            assert same_answers(answer, daemon), f"the daemon answered {daemon}, a data port: {context}"
        # The client's own refusal of an answer (a status message past its metadata limit) is no answer.
        assert "metadata size exceeds" not in answer.details, f"the client refused the answer: {context}"
        assert answer.code in expect.codes, f"expected {sorted(c.name for c in expect.codes)}: {context}"
        if answer.code == Code.UNKNOWN:
            assert answer.remote_type, f"UNKNOWN without the model's exception: {context}"
            assert expect.remote in answer.remote_type, f"expected a remote {expect.remote}: {context}"
        if answer.code == Code.OK:
            try:
                if method == "ModelInfer":
                    check_infer_answer(request, expect, answer.response)
                elif expect.check is not None:
                    expect.check(answer.response)
            except AssertionError as error:
                raise AssertionError(f"wrong answer: {error}\n  {context}") from None

    def assert_serving(self, context: str) -> None:
        """The daemon is up, tritonclient's infer on echo works, and its workers are all there."""
        assert self.daemon.process is not None and self.daemon.process.poll() is None, (
            f"the daemon died ({context}):\n{self.daemon.log[-5000:]}"
        )
        values = np.random.default_rng(len(context)).standard_normal((2, 3), dtype=np.float32)
        tensor = triton.InferInput("x", [2, 3], "FP32")
        tensor.set_data_from_numpy(values)
        result = self.client.infer("echo", [tensor], client_timeout=CALL_TIMEOUT)
        output = result.as_numpy("output0")
        assert output is not None and output.tobytes() == values.tobytes(), context
        assert self.client.is_model_ready("echo"), context
        for client in self.port_clients:  # each data port's worker serves too
            result = client.infer("echo", [tensor], client_timeout=CALL_TIMEOUT)
            output = result.as_numpy("output0")
            assert output is not None and output.tobytes() == values.tobytes(), f"a data port after {context}"
            assert client.is_model_ready("echo"), f"a data port after {context}"
        assert wait_until(lambda: len(descendants_of(self.daemon.pid)) == self.descendants, 30), (
            f"{context}: the daemon has {len(descendants_of(self.daemon.pid))} descendants,"
            f" {self.descendants} at the start"
        )
        # Tensors past the threshold travel in arenas: one per worker and direction, reused.
        segments = self.daemon_segments()
        assert len(segments) <= self.segments + 2 * self.pool_workers, f"{context}: segments {sorted(segments)}"

    def daemon_segments(self) -> set[str]:
        return {name for name in shm_segments() if name.startswith(f"deployd-{self.daemon.pid}-")}


@pytest.fixture(scope="module", params=list(PATHS))
def v2_target(
    request: pytest.FixtureRequest, package_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    on_path = request.param
    sections: dict[str, dict[str, object]] = {"pool": {"data_ports": 0}} if on_path == "data_port" else {}
    path = write_config(tmp_path_factory.mktemp("fuzz_v2") / "config.yaml", package_dir, **sections)
    config = yaml.safe_load(path.read_text())
    config["models"] = MODELS
    path.write_text(yaml.safe_dump(config))
    daemon = DaemonProcess(path).start()
    print(f"v2 fuzz seed {SEED}, {FUZZ_SECONDS:g} s, {on_path} path")
    ports: list[grpc.Channel] = []
    clients: list[triton.InferenceServerClient] = []
    try:
        options = [("grpc.max_receive_message_length", MESSAGE_LIMIT), ("grpc.max_send_message_length", MESSAGE_LIMIT)]
        with grpc.insecure_channel(daemon.target, options=options) as channel:
            client = triton.InferenceServerClient(daemon.target)
            try:
                workers = config["pool"]["workers"]
                if on_path == "data_port":
                    addresses = data_port_addresses(daemon, workers)
                    ports = [grpc.insecure_channel(address, options=options) for address in addresses]
                    clients = [triton.InferenceServerClient(address) for address in addresses]
                fuzzed = Target(daemon, channel, client, workers, on_path, ports, clients)
                fuzzed.descendants = len(descendants_of(daemon.pid))
                fuzzed.segments = len(fuzzed.daemon_segments())
                fuzzed.assert_serving("the start")
                yield fuzzed
                fuzzed.assert_serving("the last test")
                print(f"v2 fuzz answers ({on_path} path): {dict(sorted(fuzzed.codes.items()))}")
            finally:
                for each in (client, *clients):
                    each.close()
    finally:
        for port in ports:
            port.close()
        daemon.assert_clean_stop()


# ------------------------------------------------------------------ random requests

DATATYPES = [*SUPPORTED, *SUPPORTED, "UINT16", "UINT32", "UINT64", "STRING", "", "fp32", "FP32 ", "FP8", "\u2603"]
DATATYPES += ["F" * 20_000]
UNKNOWN_NAMES = ["", "nope", "ECHO", "echo ", "echo\x00", "é", "\U0001f600", "a" * 300, "obj-0123456789abcdef"]
UNKNOWN_NAMES += ["\ud7ff\ue000", "../echo", "seed/1", LONG_NAME, "\u00e9" * 9000]
VERSIONS = ["1", "01", "0", "00", "-1", "+1", " 1", "1.0", "abc", "2", "\uff11", "\u00b2", "9" * 30]
VERSIONS += ["9" * (VERSION_DIGITS_LIMIT + 1), "1" + "0" * 5000]  # the version-digits bug (fixed)
TEXT = ["", "x", "héllo ✓", "\x00", "\U0001f600" * 3, "a" * 300, "req-7"]
OUTPUT_NAMES = ["output0", "output0", "output1", "output2", "image", "label", "doubled", "", "nope", "é", LONG_NAME]
HUGE = [2**31, 2**40, 2**61, 2**62, INT64_MAX]
FLOATS32 = [0.0, -0.0, 1.5, -2.25, math.inf, -math.inf, math.nan, 3.4e38, 1e-45, 1e39]
FLOATS64 = [0.0, -0.0, math.pi, math.inf, -math.inf, math.nan, 1.7e308, 5e-324]


def random_shape(rng: random.Random, clean: bool = False) -> list[int]:
    kind = rng.random() * (0.91 if clean else 1)
    if clean and kind > 0.84:  # empty, and big but not so big that the sizes overflow int64
        shape = [rng.choice([2**20, 2**31, 2**40]) for _ in range(rng.randint(0, 1))]
        shape.insert(rng.randint(0, len(shape)), 0)
        return shape
    if kind < 0.74:  # small
        return [rng.choice([0, 1, 1, 2, 2, 3, 5]) for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4]))]
    if kind < 0.79:  # around worker.shm_threshold_bytes (64 KiB) and past it: the shared-memory route
        return [rng.choice([16, 64, 256]), 1024]
    if kind < 0.84:  # a negative size somewhere
        shape = [rng.choice([1, 2, 3]) for _ in range(rng.randint(0, 3))]
        shape.insert(rng.randint(0, len(shape)), rng.choice([-1, -2, INT64_MIN]))
        return shape
    if kind < 0.91:  # empty but enormous (a zero anywhere): valid unless the sizes overflow int64
        shape = [rng.choice(HUGE) for _ in range(rng.randint(1, 3))]
        shape.insert(rng.randint(0, len(shape)), 0)
        return shape
    if kind < 0.95:  # too many elements
        return rng.choice([[2**31 + 1], [2**20, 2**20], [3, 2**30], [INT64_MAX]])
    if kind < 0.98:  # high rank: the limit is 32
        return [1] * rng.choice([31, 32, 33, 64, 100])
    return [rng.choice([1, 2]) for _ in range(rng.choice([8, 16, 32]))]  # deep, a few elements


def random_raw(rng: random.Random, datatype: str, shape: list[int], clean: bool = False) -> bytes:
    """Raw contents for an input: mostly of the right size (clean: always), sometimes not."""
    elements = elements_of(shape) if all(size >= 0 for size in shape) else -1
    if datatype == "BYTES":
        if not 0 <= elements <= 2048:
            return rng.randbytes(rng.randint(0, 16))
        items = [rng.randbytes(rng.choice([0, 0, 1, 3, 8, 17])) for _ in range(elements)]
        data = encode_bytes(items)
        flaw = 1.0 if clean else rng.random()
        if flaw < 0.04:
            data += encode_bytes([b"extra"])
        elif flaw < 0.08 and items:
            data = encode_bytes(items[:-1])
        elif flaw < 0.11 and data:
            data = data[: rng.randrange(len(data))]
        elif flaw < 0.14:
            data += rng.randbytes(rng.randint(1, 3))
        elif flaw < 0.17:
            data = struct.pack("<I", rng.choice([5, 2**31, 2**32 - 1])) + b"abc" + data
        return data
    size = SIZES.get(datatype, 4)
    if not 0 <= elements * size <= 4 * 1024 * 1024:
        return rng.randbytes(rng.randint(0, 16))
    data = rng.randbytes(elements * size)
    if datatype == "BOOL":  # only 0 and 1: another byte is not a bool torch knows
        data = bytes(byte & 1 for byte in data)
    flaw = 1.0 if clean else rng.random()
    if flaw < 0.06:
        data += rng.randbytes(rng.randint(1, 9))
    elif flaw < 0.12 and data:
        data = data[: rng.randrange(len(data))]
    return data


def random_values(rng: random.Random, field_name: str, datatype: str, count: int, clean: bool) -> list[Any]:
    """count values for a typed contents field; for a narrow datatype sometimes out of its range."""
    bounds = TYPED.get(datatype, ("", "", None))[2]
    out_of_range = bounds is not None and not clean and rng.random() < 0.1
    values: list[Any] = []
    for _ in range(count):
        if field_name == "bool_contents":
            values.append(rng.random() < 0.5)
        elif field_name in ("int_contents", "uint_contents"):
            low, high = (INT32_MIN, INT32_MAX) if field_name == "int_contents" else (0, 2**32 - 1)
            if bounds is not None and field_name == TYPED[datatype][0] and not out_of_range:
                low, high = bounds
            values.append(rng.choice([low, high, 0, rng.randint(low, high)]))
        elif field_name == "int64_contents":
            values.append(rng.choice([INT64_MIN, INT64_MAX, 0, rng.randint(INT64_MIN, INT64_MAX)]))
        elif field_name == "uint64_contents":
            values.append(rng.randint(0, 2**64 - 1))
        elif field_name == "fp32_contents":
            values.append(rng.choice([*FLOATS32, rng.uniform(-1e6, 1e6)]))
        elif field_name == "fp64_contents":
            values.append(rng.choice([*FLOATS64, rng.uniform(-1e300, 1e300)]))
        else:
            values.append(rng.randbytes(rng.choice([0, 1, 4, 9])))
    return values


def fill_typed(rng: random.Random, tensor: Any, datatype: str, shape: list[int], clean: bool = False) -> None:
    elements = elements_of(shape) if all(size >= 0 for size in shape) else -1
    count = elements if 0 <= elements <= 4096 else rng.randint(0, 8)
    if not clean and rng.random() < 0.1:
        count = max(0, count + rng.choice([-1, 1, 2]))
    right = TYPED[datatype][0] if datatype in TYPED else None
    field_name = right if right is not None and (clean or rng.random() < 0.85) else rng.choice(FIELDS)
    if count or rng.random() < 0.5:
        getattr(tensor.contents, field_name).extend(random_values(rng, field_name, datatype, count, clean))
    if rng.random() < 0.05:  # a second field: the daemon reads only the datatype's own
        other = rng.choice(FIELDS)
        if other != field_name:
            getattr(tensor.contents, other).extend(random_values(rng, other, datatype, rng.randint(0, 3), clean))


def random_inputs(rng: random.Random, model: str, clean: bool) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of each input: proper for the model's declarations, or random
    (clean: supported datatypes and shapes the limits take, one input for echo)."""
    proper = clean or rng.random() < 0.5
    if model == "declared" and proper:
        inputs = [("image", "FP32", [rng.choice([0, 1, 3]), 2]), ("label", "INT64", [rng.choice([0, 1, 4])])]
        rng.shuffle(inputs)
        return inputs
    if model == "scaled" and proper:
        return [("x", "FP32", [rng.choice([0, 1, 7, 20000])])]
    if model == "seed" and proper:
        return [("input0", "FP32", [rng.choice([0, 1, 2]), 1, rng.choice([9, 10, 12]), 10])]
    names = ["x", "y", "image", "label", "x", "", "input0", "\u2603", LONG_NAME]
    if clean:
        count = 1 if model == "echo" else rng.randint(1, 3)
        return [(rng.choice(names), rng.choice(SUPPORTED), random_shape(rng, clean)) for _ in range(count)]
    count = rng.choice([0, 1, 1, 1, 1, 2, 2, 3, 4])
    inputs = [(rng.choice(names), rng.choice(DATATYPES), random_shape(rng)) for _ in range(count)]
    if model == "seed":  # the conv net takes long over big inputs: keep them small
        inputs = [(name, datatype, shape) for name, datatype, shape in inputs if elements_of(shape) < 10_000]
    return inputs


def random_request(rng: random.Random) -> v2.ModelInferRequest:
    """A request, often flawed; a third of them clean: a known model, no flaw meant."""
    clean = rng.random() < 0.35
    kind = rng.random()
    if clean:
        model = "echo" if kind < 0.6 else rng.choice(["many", "declared", "scaled"])
    else:
        model = "echo" if kind < 0.45 else rng.choice(UNKNOWN_NAMES) if kind < 0.55 else rng.choice(sorted(BY_MODEL))
    request = v2.ModelInferRequest(model_name=model)
    if rng.random() < 0.3:
        request.model_version = rng.choice(["", "1", "01"] if clean else VERSIONS)
    if rng.random() < 0.3:
        request.id = rng.choice(TEXT)
    if rng.random() < 0.1:  # parameters: the daemon ignores them
        parameter = request.parameters[rng.choice(TEXT)]
        rng.choice([lambda: setattr(parameter, "string_param", "x"), lambda: setattr(parameter, "int64_param", -1)])()
    inputs = random_inputs(rng, model, clean)
    mode = rng.choices(["raw", "typed", "mixed"], [0.55, 0.4, 0.0 if clean else 0.05])[0]
    if clean and any(datatype in NO_TYPED_FIELD for _, datatype, _ in inputs):
        mode = "raw"  # FP16 and BF16 have no typed field
    for name, datatype, shape in inputs:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if rng.random() < 0.05:
            tensor.parameters["binary_data_size"].int64_param = rng.randint(-1, 99)
        if mode != "typed":
            request.raw_input_contents.append(random_raw(rng, datatype, shape, clean))
        elif datatype in TYPED or rng.random() < 0.5:
            fill_typed(rng, tensor, datatype, shape, clean)
    if mode == "mixed":  # raw contents for too few or too many inputs, or contents beside them
        how = rng.random()
        if how < 0.35 and request.raw_input_contents:
            del request.raw_input_contents[-1]
        elif how < 0.7 or not request.inputs:
            request.raw_input_contents.append(rng.randbytes(rng.randint(0, 8)))
        else:
            rng.choice(request.inputs).contents.fp32_contents.append(1.0)
    if rng.random() < 0.25:
        for _ in range(rng.randint(1, 3)):
            request.outputs.add(name=rng.choice(OUTPUT_NAMES))
    return request


def describe(request: v2.ModelInferRequest) -> str:
    """A request in words, its raw contents shortened; with its bytes when they are few."""
    short = v2.ModelInferRequest()
    short.CopyFrom(request)
    del short.raw_input_contents[:]
    text = str(short).replace("\n", " ")
    text = text if len(text) <= 3000 else f"{text[:3000]}..."
    raws = [f"{len(raw)} bytes {raw[:24].hex()}" for raw in request.raw_input_contents]
    payload = request.SerializeToString()
    data = f"\n  bytes {payload.hex()}" if len(payload) <= 2048 else ""
    return f"ModelInfer {{{text}}} raw_input_contents {raws}{data}"


def random_other_request(rng: random.Random) -> tuple[str, Message]:
    method = rng.choice(["ModelReady", "ModelMetadata", "RepositoryIndex", "ServerLive", "ServerMetadata"])
    name = rng.choice([*UNKNOWN_NAMES, *BY_MODEL, *BY_MODEL])
    version = rng.choice(["", "", *VERSIONS])
    if method == "ModelReady":
        return method, v2.ModelReadyRequest(name=name, version=version)
    if method == "ModelMetadata":
        return method, v2.ModelMetadataRequest(name=name, version=version)
    if method == "RepositoryIndex":
        return method, v2.RepositoryIndexRequest(repository_name=rng.choice(TEXT), ready=rng.random() < 0.5)
    return method, METHODS[method][0]()


def _round_words(number: int, request: v2.ModelInferRequest) -> str:
    return f"round {number}: {describe(request)}"


def test_random_infer_requests(v2_target: Target) -> None:
    """Random ModelInferRequests (and metadata and readiness requests), each answer as the rules say."""
    test = v2_target.test_id("test_random_infer_requests")
    rng = path_rng("test_random_infer_requests", v2_target.path)
    for number in rounds(v2_target.seconds(0.55), 20_000):
        if rng.random() < 0.85:
            request = random_request(rng)
            words = functools.partial(_round_words, number, request)
            v2_target.send("ModelInfer", request.SerializeToString(), words, test)
        else:
            method, message = random_other_request(rng)
            text = str(message).replace("\n", " ")[:3000]
            v2_target.send(method, message.SerializeToString(), f"round {number}: {method} {{{text}}}", test)
        if number % 200 == 199:
            v2_target.assert_serving(f"{number + 1} random requests")
    v2_target.assert_serving("random requests")


# ------------------------------------------------------------------ mutated request bytes


def valid_requests() -> dict[str, list[bytes]]:
    """Valid serialized requests of each method fuzzed, to mutate."""
    echo_raw = v2.ModelInferRequest(model_name="echo", id="r1")
    echo_raw.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    echo_raw.raw_input_contents.append(struct.pack("<4f", 1.0, -2.0, 0.5, math.inf))
    echo_typed = v2.ModelInferRequest(model_name="echo", model_version="1")
    echo_typed.inputs.add(name="x", datatype="INT16", shape=[3]).contents.int_contents.extend([-32768, 0, 32767])
    echo_bytes = v2.ModelInferRequest(model_name="echo")
    echo_bytes.inputs.add(name="x", datatype="BYTES", shape=[3])
    echo_bytes.raw_input_contents.append(encode_bytes([b"ab", b"", b"c\x00d"]))
    many = v2.ModelInferRequest(model_name="many")
    many.inputs.add(name="a", datatype="INT64", shape=[2]).contents.int64_contents.extend([INT64_MIN, 5])
    many.inputs.add(name="b", datatype="BOOL", shape=[1, 2]).contents.bool_contents.extend([True, False])
    many.inputs.add(name="c", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"x", b"yz"])
    many.outputs.add(name="output2")
    many.outputs.add(name="output0")
    declared = v2.ModelInferRequest(model_name="declared")
    declared.inputs.add(name="label", datatype="INT64", shape=[2])
    declared.inputs.add(name="image", datatype="FP32", shape=[1, 2])
    declared.raw_input_contents.extend([struct.pack("<2q", 7, -7), struct.pack("<2f", 0.25, -0.0)])
    scaled = v2.ModelInferRequest(model_name="scaled", parameters={"p": v2.InferParameter(bool_param=True)})
    scaled.inputs.add(name="x", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1.5, -0.0, 3e38])
    seed = v2.ModelInferRequest(model_name="seed")
    seed.inputs.add(name="input0", datatype="FP32", shape=[1, 1, 10, 10])
    seed.raw_input_contents.append(np.linspace(-1, 1, 100, dtype=np.float32).tobytes())
    half = v2.ModelInferRequest(model_name="echo")
    half.inputs.add(name="x", datatype="BF16", shape=[2])
    half.raw_input_contents.append(b"\x80\x3f\x00\xc0")
    infer = [echo_raw, echo_typed, echo_bytes, many, declared, scaled, seed, half]
    messages: dict[str, list[Message]] = {
        "ModelInfer": list(infer),
        "ModelReady": [v2.ModelReadyRequest(name="echo"), v2.ModelReadyRequest(name="seed", version="1")],
        "ModelMetadata": [v2.ModelMetadataRequest(name="declared"), v2.ModelMetadataRequest(name="seed", version="1")],
        "RepositoryIndex": [v2.RepositoryIndexRequest(repository_name="", ready=True)],
        "ServerLive": [v2.ServerLiveRequest()],
        "ServerReady": [v2.ServerReadyRequest()],
        "ServerMetadata": [v2.ServerMetadataRequest()],
    }
    return {method: [message.SerializeToString() for message in found] for method, found in messages.items()}


def test_valid_requests_are_answered_as_predicted(v2_target: Target) -> None:
    """The oracle itself: each unmutated base request gets OK and exactly the predicted outputs."""
    for method, payloads in valid_requests().items():
        for payload in payloads:
            request, expect = predict(method, payload)
            assert expect.codes >= {Code.OK} and Code.INVALID_ARGUMENT not in expect.codes, (method, request)
            test = v2_target.test_id("test_valid_requests_are_answered_as_predicted")
            v2_target.send(method, payload, f"{method} {request}", test)


def _bytes_words(number: int, method: str, payload: bytes) -> str:
    return f"round {number}: {method} with bytes {payload.hex()}"


def test_mutated_request_bytes(v2_target: Target) -> None:
    """Random and mutated bytes of valid requests (and of random ones) through a raw channel."""
    test = v2_target.test_id("test_mutated_request_bytes")
    rng = path_rng("test_mutated_request_bytes", v2_target.path)
    bases = valid_requests()
    every_base = [payload for payloads in bases.values() for payload in payloads]
    for number in rounds(v2_target.seconds(0.45), 20_000):
        method = rng.choices(sorted(bases), [1 if name != "ModelInfer" else 6 for name in sorted(bases)])[0]
        if rng.random() < 0.1:
            payload = rng.randbytes(rng.randint(0, 64))
        else:
            base = rng.choice(bases[method])
            if method == "ModelInfer" and rng.random() < 0.3:
                base = random_request(rng).SerializeToString()
                if len(base) > 65536:
                    base = rng.choice(bases[method])
            payload = mutate(rng, base, every_base)
        v2_target.send(method, payload, functools.partial(_bytes_words, number, method, payload), test)
        if number % 200 == 199:
            v2_target.assert_serving(f"{number + 1} mutated requests")
    v2_target.assert_serving("mutated request bytes")


# ------------------------------------------------------------------ found by the fuzz


@pytest.mark.parametrize(
    ("shape", "raw"),
    [([2, 0], True), ([1, 0], False), ([0, 0], True), ([3, 2, 0], False)],
    ids=["2x0-raw", "1x0-typed", "0x0-raw", "3x2x0-typed"],
)
def test_bytes_with_a_zero_sized_inner_dimension(v2_target: Target, shape: list[int], raw: bool) -> None:
    """Nested by shape, [2, 0] is [[], []]: a list of empty lists, which has no tensor form
    (INVALID_ARGUMENT); [0, 0] is [], no outputs (OK)."""
    request = v2.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="BYTES", shape=shape)
    if raw:
        request.raw_input_contents.append(b"")
    test = "test_bytes_with_a_zero_sized_inner_dimension"
    v2_target.send("ModelInfer", request.SerializeToString(), describe(request), test)


@pytest.mark.parametrize("method", ["ModelInfer", "ModelReady", "ModelMetadata"])
def test_a_version_of_more_than_4300_digits(v2_target: Target, method: str) -> None:
    version = "1" * (VERSION_DIGITS_LIMIT + 1)
    if method == "ModelInfer":
        request: Message = v2.ModelInferRequest(model_name="echo", model_version=version)
        request.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)  # type: ignore[attr-defined]
    elif method == "ModelReady":
        request = v2.ModelReadyRequest(name="echo", version=version)
    else:
        request = v2.ModelMetadataRequest(name="echo", version=version)
    # Not loaded: NOT_FOUND, not ready (or refused, INVALID_ARGUMENT); never an internal error.
    test = "test_a_version_of_more_than_4300_digits"
    v2_target.send(method, request.SerializeToString(), f"{method} {version[:20]}...", test)


@pytest.mark.parametrize(
    ("where", "code"),
    [
        ("model", Code.NOT_FOUND),
        ("input", Code.INVALID_ARGUMENT),
        ("datatype", Code.INVALID_ARGUMENT),
        ("output", Code.INVALID_ARGUMENT),
        ("metadata", Code.NOT_FOUND),
    ],
    ids=["model", "input", "datatype", "output", "metadata"],
)
def test_a_long_name_in_an_error(v2_target: Target, where: str, code: grpc.StatusCode) -> None:
    """The daemon truncates a version it quotes (64 characters), not a name: a caller with a long
    name gets no NOT_FOUND or INVALID_ARGUMENT, and cannot tell what was wrong."""
    if where == "metadata":
        request: Message = v2.ModelMetadataRequest(name=LONG_NAME)
        method = "ModelMetadata"
    else:
        method = "ModelInfer"
        request = v2.ModelInferRequest(model_name=LONG_NAME if where == "model" else "echo")
        name = LONG_NAME if where == "input" else "x"
        datatype = {"datatype": "F" * 20_000, "output": "INT16"}.get(where, "UINT16")
        request.inputs.add(name=name, datatype=datatype, shape=[1])  # type: ignore[attr-defined]
        request.raw_input_contents.append(b"\0\0")  # type: ignore[attr-defined]
        if where == "output":
            request.outputs.add(name=LONG_NAME)  # type: ignore[attr-defined]
    answer = v2_target.call(method, request.SerializeToString())
    assert answer.code == code, f"{method} with a long {where} name: got {answer}"
