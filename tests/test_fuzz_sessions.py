"""Fuzz a live daemon's deployd.v1.Sessions service (torch::deploy's InterpreterSession and Obj).

Two tests against a daemon of their own (two workers, small limits.max_sessions and
limits.max_session_objects, so both limits are met):

- garbage and mutated bytes as the request of every Sessions method, through a raw channel
  (OpenSession as a stream: its first message at most, then cancelled);
- random well-formed steps on real sessions (plain ones, ones on a given worker slot, ones whose
  self is a loaded object, model or package): Global with sane and insane names, FromValue of
  random wire values, Call with values and Objs mixed (of this session, unknown numbers, of
  other, closed and unknown sessions), Attr, HasAttr, ToValue, FromMovable, CreateMovable (with
  valid and invalid names; what it made is unloaded again), CloseSession and cancelled streams
  at random, and opening past the limits. A small model of the daemon (which sessions are
  open, which objects each holds) predicts each answer's status: the answer must be one of them.

Every answer must be a proper status (never INTERNAL, UNAVAILABLE or DEADLINE_EXCEEDED; UNKNOWN
only with the remote exception type in deployd-error-detail-bin), and after each round the
daemon must still serve a normal Invoke, have the same workers (no restart: no step here may
kill one, see DENIED_MODULES), show in Status exactly the sessions the fuzz holds (each with the
objects the fuzz counted) and no package left by a movable. At the end, with every session
closed, Status shows none, and the daemon stops with no leaked process or /dev/shm segment.

Nothing here calls what may legitimately kill or hang a worker: Global names come from lists
(DENIED_MODULES and DENIED_NAMES are checked on every name sent, the mutated ones included), as do
attribute and method names (DENIED_ATTRS: the test models' exit_now, segfault, spin, hog, ...).
Integers that size an allocation are small or so large that it fails at once.

Bounded in time by DEPLOYD_FUZZ_SECONDS (default 20, shared by the two fuzz tests; `make fuzz`
runs 300) and in count; seeded from DEPLOYD_FUZZ_SEED like tests/test_fuzz.py (random when
unset): a failure prints the seed, and the same seed replays the same requests.

Bugs the fuzz found are kept as tests ("Found by the fuzz"), all fixed: the fuzz tolerates no
answer but a proper one.
"""

from __future__ import annotations

import collections
import functools
import os
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError, Message

from client import InterpreterManager
from deployd_wire.proto import deployd_pb2 as pb
from server.pool.procinfo import descendants_of
from tests.conftest import write_config
from tests.daemon_process import DaemonProcess, shm_segments, wait_until
from tests.test_fuzz import (
    CALL_TIMEOUT,
    INT64_MAX,
    INT64_MIN,
    SEED,
    TEXT,
    Answer,
    answer_of,
    mutate,
    random_value,
    rng_for,
    rounds,
)

FUZZ_SECONDS = float(os.environ.get("DEPLOYD_FUZZ_SECONDS", "20"))
SERVICE = "/deployd.v1.Sessions/"
Code = grpc.StatusCode
WORKERS = 2
MAX_SESSIONS = 4  # limits.max_sessions of the daemon under fuzz
MAX_OBJECTS = 12  # limits.max_session_objects
MESSAGE_LIMIT = 64 * 1024 * 1024
# What a request may get. UNKNOWN only with the model's exception type attached.
PROPER = {
    Code.OK,
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED,
    Code.UNKNOWN,
}
UINT64_MAX = 2**64 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
LONG_NAME = "n" * 20_000
NO_EVENT = "OpenSession's stream ended without a SessionEvent"

# Bugs the fuzz found, fixed, with their tests below ("Found by the fuzz"): OpenSession(worker=N)
# outside the pool's slots was UNAVAILABLE (now INVALID_ARGUMENT); a step's error quoting a long
# name travelled whole in the error trailer, past grpc's metadata limit (its traceback is now cut
# to fit).

# ------------------------------------------------------------------ what the fuzz never runs

# Modules whose import or use may end, hang or outlive a worker (or the machine's patience).
DENIED_MODULES = {
    "os", "posix", "sys", "subprocess", "signal", "ctypes", "_ctypes", "time", "threading", "_thread",
    "multiprocessing", "torch.multiprocessing", "concurrent", "asyncio", "socket", "faulthandler", "gc",
    "resource", "pty", "atexit", "importlib", "shutil", "tempfile", "pdb", "code", "webbrowser", "antigravity",
    "this", "tkinter", "turtle", "idlelib", "mmap", "select", "selectors", "io", "_io", "builtins.open",
}  # fmt: skip
# Names that end the worker, wait for input, run code from text or reach any module; and those
# that make or walk something as large as an integer says (pow, range, bytes), or iterate without
# sizing first (min, max, sum, zip, enumerate: over a zero-element tensor of shape [2**62, 0]
# they would run for ever), or make pids and hashes into sizes.
DENIED_NAMES = {
    "exit", "quit", "_exit", "abort", "input", "breakpoint", "help", "eval", "exec", "compile", "__import__",
    "open", "globals", "locals", "vars", "print", "sleep", "system", "kill", "fork", "setattr", "delattr",
    "pow", "range", "memoryview", "bytearray", "bytes", "min", "max", "sum", "zip", "enumerate", "iter", "next",
    "map", "filter", "all", "any", "hash", "id", "partial",
}  # fmt: skip
# Attributes never asked for, never called: ways to end or hang a worker (the test models'
# exit_now, segfault, spin, hog, nap), what reaches modules (and so the denied ones) from any
# object, what grows an object by a factor (repeat, __mul__), what moves a tensor's large empty
# dimensions first (T, permute: see DENIED_NAMES), and pids, which make sizes of a million.
DENIED_ATTRS = {
    "exit", "quit", "_exit", "abort", "input", "breakpoint", "__import__", "open", "system", "kill", "fork",
    "sleep", "exec", "setattr", "delattr", "globals", "locals", "exit_now", "raise_system_exit", "segfault",
    "spin", "hog", "nap", "call_module", "import_module",
    "__globals__", "__builtins__", "__subclasses__", "__init__", "__del__", "__setattr__", "__delattr__",
    "__reduce__", "__reduce_ex__", "__getstate__", "__setstate__", "__code__", "__closure__", "__loader__",
    "__spec__", "__dict__", "__self__", "__func__", "__wrapped__", "f_globals", "repeat", "expand", "resize_",
    "new_empty", "new_zeros", "new_ones", "new_full", "extend", "__mul__", "__rmul__", "__imul__", "__pow__",
    "zfill", "ljust", "rjust", "center", "expandtabs", "T", "mT", "H", "mH", "t", "permute", "transpose",
    "movedim", "swapaxes", "view", "reshape", "pid", "tagged_double", "factor_here", "kept_sum",
}  # fmt: skip


def denied_global(module: str, name: str) -> bool:
    parts = module.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return bool(prefixes & DENIED_MODULES) or name in DENIED_NAMES or f"{module}.{name}" in DENIED_MODULES


def denied_attr(name: str) -> bool:
    return name in DENIED_ATTRS


# ------------------------------------------------------------------ names and values

SANE_GLOBALS = [
    ("builtins", "len"), ("builtins", "repr"), ("builtins", "str"), ("builtins", "int"), ("builtins", "float"),
    ("builtins", "bool"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "dict"), ("builtins", "type"),
    ("builtins", "isinstance"), ("builtins", "abs"), ("builtins", "sorted"), ("builtins", "getattr"),
    ("builtins", "hasattr"), ("builtins", "object"), ("builtins", "ValueError"), ("builtins", "None"),
    ("torch", "zeros"), ("torch", "ones"), ("torch", "tensor"), ("torch", "add"), ("torch", "cat"), ("torch", "stack"),
    ("torch", "neg"), ("torch", "float32"), ("torch", "Tensor"), ("torch", "nn"), ("torch", "ones_like"),
    ("torch.nn", "Linear"), ("torch.nn", "ReLU"), ("torch.nn", "Sequential"), ("torch.nn.functional", "relu"),
    ("math", "sqrt"), ("math", "pi"), ("math", "inf"), ("math", "isnan"), ("operator", "add"), ("operator", "getitem"),
    ("operator", "neg"), ("json", "dumps"), ("json", "loads"), ("collections", "OrderedDict"), ("copy", "deepcopy"),
    ("deployd_extra_helper", "triple"), ("numpy", "float64"), ("numpy", "asarray"),
]  # fmt: skip
INSANE_GLOBALS = [
    ("no_such_module_deployd", "x"), ("builtins", "no_such_name"), ("", "len"), ("builtins", ""), ("", ""),
    ("\x00", "x"), ("builtins", "\x00"), ("x" * 300, "y"), ("builtins", "y" * 300), (".relative", "x"),
    ("torch.", "zeros"), ("torch..nn", "x"), ("é", "ü"), ("\U0001f600", "x"), ("torch", "zeros.__call__"),
    ("builtins.len", "x"), ("math", "\ud7ff\ue000"), (" builtins", "len"), ("builtins", " len"), ("..", "."),
    ("torch.nn.modules.no_such", "Linear"), ("json", "__name__"), ("torch", "__version__"),
]  # fmt: skip
LONG_GLOBALS = [(LONG_NAME, "x"), ("builtins", LONG_NAME), ("torch", "a" * 5000)]
ATTR_NAMES = [
    "__class__", "__doc__", "__len__", "__repr__", "__str__", "__name__", "__module__", "__add__", "__getitem__",
    "__eq__", "__hash__", "__call__", "__iter__", "__next__", "__contains__", "__bool__", "mro",
    "shape", "dtype", "data", "grad", "requires_grad", "real", "sum", "mean", "neg", "abs", "clone", "detach",
    "tolist", "numel", "item", "float", "int", "add", "add_", "backward", "size", "dim",
    "keys", "values", "items", "get", "copy", "append", "pop", "index", "count", "upper", "lower", "split", "strip",
    "encode", "decode", "join", "startswith",
    "weight", "bias", "factor", "forward", "describe", "calls", "numpy_total", "fail", "keep",
    "multiply_factor_in_place", "weight_file", "input_file", "unsendable", "pair",
    "load_pickle", "load_text", "load_binary", "parameters", "state_dict", "train", "eval", "zero_grad",
    "Linear", "ReLU", "functional", "__version__",
    "no_such_attr", "", "\x00", "a" * 300, "é", "\U0001f600", " shape", "shape ", "__",
]  # fmt: skip
# Attributes and methods that objects of a type have (type name, or its last parts): a sensible
# step asks for them, so that calls succeed and make objects that later steps use.
_TENSOR = ["shape", "dtype", "data", "grad", "requires_grad", "sum", "mean", "neg", "abs", "clone", "detach", "tolist"]
_TENSOR += ["numel", "item", "float", "int", "add", "add_", "size", "dim", "backward", "real", "__getitem__"]
TYPE_ATTRS = {
    "torch.Tensor": _TENSOR,
    "torch.nn.parameter.Parameter": _TENSOR,
    "list": ["copy", "count", "index", "append", "pop", "__len__", "__getitem__", "__contains__", "__add__"],
    "tuple": ["count", "index", "__len__", "__getitem__", "__add__", "__contains__"],
    "dict": ["keys", "values", "items", "get", "copy", "pop", "__len__", "__getitem__"],
    "collections.OrderedDict": ["keys", "values", "items", "get", "copy", "pop", "__len__", "__getitem__"],
    "str": ["upper", "lower", "split", "strip", "encode", "startswith", "join", "__len__", "__add__", "__getitem__"],
    "bytes": ["decode", "__len__", "upper", "__getitem__"],
    "int": ["__add__", "real", "__eq__", "__bool__"],
    "float": ["__add__", "real", "__eq__", "__bool__"],
    "bool": ["__add__", "__eq__"],
    "Linear": ["weight", "bias", "forward", "parameters", "state_dict", "train", "eval", "zero_grad", "__call__"],
    "Sequential": ["forward", "parameters", "state_dict", "train", "eval", "__len__", "__getitem__", "__call__"],
    "ReLU": ["forward", "__call__"],
    "Scale": ["factor", "forward", "describe", "calls", "numpy_total", "fail", "keep", "multiply_factor_in_place"],
    "Echo": ["pair", "__call__"],
    "EchoMany": ["__call__"],
    "PackageImporter": ["load_pickle", "load_text", "load_binary"],
    "module": ["Linear", "ReLU", "functional", "__name__", "Sequential"],
    "torch.dtype": ["is_floating_point", "itemsize", "__repr__"],
}
TYPE_ATTRS["testmodels.Scale"] = TYPE_ATTRS["Scale"] + ["weight_file", "input_file", "unsendable", "__call__"]
CALLABLE_TYPES = ("builtin_function_or_method", "type", "function", "Linear", "ReLU", "Sequential", "Echo", "Scale")
CALLABLE_TYPES += ("EchoMany", "method", "builtin_method", "method-wrapper")


def attrs_of(type_name: str) -> list[str]:
    """The attributes objects of that type have ([] if the fuzz knows none)."""
    for key, names in TYPE_ATTRS.items():
        if type_name == key or type_name.endswith(f".{key}"):
            return names
    return []


KWARG_NAMES = ["alpha", "dim", "keepdim", "x", "value", "suffix", "offset", "negate", "", "\x00", "é", "a" * 300]
SMALL_INTS = [-1, 0, 1, 2, 3, 4]
PACKAGE_ARGS = [
    ("models", "echo.pkl"), ("models", "scale.pkl"), ("models", "many.pkl"), ("models", "notes.txt"),
    ("models", "blob.bin"), ("models", "nope.pkl"), ("nope", "x"), ("", ""), ("models", "\x00"),
]  # fmt: skip
MOVABLE_NAMES_BAD = ["a b", "x" * 129, "obj-0123", "\x00", "é", "n/1", " lead"]
UNKNOWN_SESSION_IDS = ["", "0" * 16, "ffffffffffffffff", "no-such-session", "\x00", "é" * 5, "s" * 300, LONG_NAME]
FROM_MOVABLE_TARGETS = ["nope", "", "obj-0123456789abcdef", "\x00", "a" * 300]


def check_names_allowed(request: Message) -> bool:
    """Whether a request (perhaps mutated) asks for nothing denied: its Global names, method and
    attribute names, and every string anywhere in it that could be used as one (kwargs keys)."""
    if isinstance(request, pb.GlobalRequest):
        return not denied_global(request.module, request.name)
    if isinstance(request, pb.ObjCallRequest):
        return not denied_attr(request.method) and not any(denied_attr(name) for name in request.kwargs)
    if isinstance(request, pb.ObjAttrRequest):
        return not denied_attr(request.name)
    return True


def _items(value: Any) -> list[Any]:
    """A field's value as a list: one message, a repeated field's items, or a map's keys and values."""
    if isinstance(value, (str, bytes, int, float, Message)):  # (bool and enums are ints)
        return [value]
    if hasattr(value, "keys"):
        return [part for key, item in value.items() for part in (key, item)]  # a map field
    return list(value)  # (upb's repeated containers are sequences with no __iter__ attribute)


def refs_in(message: Message, session_id: str) -> Iterator[int]:
    """The numbers of the Objs of a session anywhere in a request's values."""
    for _, value in message.ListFields():
        for item in _items(value):
            if isinstance(item, pb.ObjRef):
                if item.session_id == session_id:
                    yield item.obj_id
            elif isinstance(item, Message):
                yield from refs_in(item, session_id)


def replay_hint(test: str) -> str:
    return (
        f"replay: DEPLOYD_FUZZ_SEED={SEED} DEPLOYD_FUZZ_SECONDS={FUZZ_SECONDS:g}"
        f" pytest tests/test_fuzz_sessions.py::{test}"
    )


def words(method: str, request: Message | None, payload: bytes) -> str:
    """A request in words for a failure: its text (long strings cut), and its bytes when they are few."""
    text = ""
    if request is not None:
        text = str(request).replace("\n", " ")
        text = text if len(text) <= 3000 else f"{text[:3000]}..."
    data = f"\n  bytes {payload.hex()}" if len(payload) <= 4096 else f"\n  ({len(payload)} bytes)"
    return f"{method} {{{text}}}{data}"


# ------------------------------------------------------------------ the daemon under fuzz


@dataclass
class Held:
    """A session the fuzz opened: its stream (the lease) and what the daemon holds for it."""

    id: str
    worker: int
    stream: Any
    objects: dict[int, str] = field(default_factory=dict)  # number -> type name, of the steps that made one
    made: int = 0  # objects the daemon counts for it (SessionStatus.objects)
    # The number the daemon gives the next step that makes an object. Every step past the
    # daemon's checks takes one, whether or not the worker makes the object: such a number
    # passes the daemon's check of an argument and fails in the worker (NOT_FOUND there).
    next_number: int = 1
    values: dict[int, bytes] = field(default_factory=dict)  # number -> the wire value it was made of, unchanged
    ended: str = ""  # why, once ended: the text a later step must be told


@dataclass
class Target:
    daemon: DaemonProcess
    channel: grpc.Channel
    manager: InterpreterManager
    echo_id: str
    scale_id: str
    models_id: str
    model_name: str
    workers: dict[int, int]  # slot -> pid at the start
    descendants: int
    packages: set[str]  # loaded at the start: a movable's package must go with it
    segments: int
    codes: collections.Counter[str] = field(default_factory=collections.Counter)

    def call(self, method: str, payload: bytes) -> Answer:
        rpc = self.channel.unary_unary(SERVICE + method)
        return answer_of(lambda: rpc(payload, timeout=CALL_TIMEOUT))

    def open(self, payload: bytes, deadline: float | None = CALL_TIMEOUT) -> tuple[Any, Answer]:
        """OpenSession: the stream, and its first message (or how it failed). A first message that
        does not come in CALL_TIMEOUT is a hang (DEADLINE_EXCEEDED), whatever the deadline."""
        rpc = self.channel.unary_stream(SERVICE + "OpenSession")
        stream = rpc(payload, timeout=deadline)
        box: list[Answer] = []

        def first() -> None:
            try:
                box.append(answer_of(lambda: next(stream)))
            except StopIteration:
                box.append(Answer(Code.OK, NO_EVENT, b""))

        reader = threading.Thread(target=first, daemon=True)
        reader.start()
        reader.join(CALL_TIMEOUT)
        if reader.is_alive():
            stream.cancel()
            reader.join(10)
            return stream, Answer(Code.DEADLINE_EXCEEDED, f"no first message in {CALL_TIMEOUT:g} s", b"")
        return stream, box[0]

    def check(
        self,
        answer: Answer,
        allowed: set[grpc.StatusCode],
        what: str | Callable[[], str],
        test: str,
        details: str = "",
        method: str = "",
    ) -> None:
        """An AssertionError unless the answer is allowed. details: a text an answer of
        FAILED_PRECONDITION must hold."""
        self.codes[f"{method} {answer.code.name}".strip()] += 1

        def context() -> str:
            return f"{what if isinstance(what, str) else what()}\n  got {answer}\n  {replay_hint(test)}"

        assert "metadata size exceeds" not in answer.details, f"the client refused the answer: {context()}"
        assert answer.code in allowed, f"expected {sorted(code.name for code in allowed)}: {context()}"
        if answer.code == Code.UNKNOWN:
            assert answer.remote_type, f"UNKNOWN without the model's exception: {context()}"
        if answer.code == Code.OK and answer.details == NO_EVENT:
            raise AssertionError(f"OpenSession's stream ended without a first message: {context()}")
        if details and answer.code == Code.FAILED_PRECONDITION:
            assert details in answer.details, f"expected {details!r} in the message: {context()}"

    def status(self) -> pb.StatusResponse:
        return self.manager.status()

    def daemon_segments(self) -> set[str]:
        return {name for name in shm_segments() if name.startswith(f"deployd-{self.daemon.pid}-")}

    def assert_serving(self, context: str, held: list[Held] | None = None, exact: bool = False) -> None:
        """The daemon is up, Invoke on echo works, its workers are the ones it started with, no
        package is left over, and Status shows no session the fuzz does not hold (exact: just
        those the fuzz holds, each with the objects the fuzz counted)."""
        assert self.daemon.process is not None and self.daemon.process.poll() is None, (
            f"the daemon died ({context}):\n{self.daemon.log[-5000:]}"
        )
        request = pb.InvokeRequest(object_id=self.echo_id, args=[pb.Value(string_value="still here")])
        try:
            result = self.manager.call(self.manager._stub.Invoke, request).result
        except Exception as error:  # pragma: no cover - a failure report
            raise AssertionError(f"a normal call failed after {context}: {error}") from error
        assert result.string_value == "still here", context
        status = self.status()
        workers = {worker.index: worker.pid for worker in status.workers}
        restarts = {worker.index: worker.restarts for worker in status.workers if worker.restarts}
        assert workers == self.workers and not restarts, (
            f"{context}: a worker died (no step here may kill one): workers {workers}, at the start"
            f" {self.workers}, restarts {restarts}\n{self.daemon.log[-5000:]}"
        )
        open_ids = {session.id for session in held or () if not session.ended}

        def shown() -> set[str]:
            return {session.session_id for session in self.status().sessions}

        assert wait_until(lambda: shown() <= open_ids, 10), (
            f"{context}: Status shows sessions the fuzz does not hold: {sorted(shown() - open_ids)}"
        )
        if exact:
            sessions = {session.session_id: session for session in self.status().sessions}
            assert set(sessions) == open_ids, f"{context}: open sessions {sorted(sessions)}, expected {open_ids}"
            for session in held or ():
                if not session.ended:
                    entry = sessions[session.id]
                    assert (entry.worker, entry.objects) == (session.worker, session.made), (
                        f"{context}: session {session.id} on worker {entry.worker} with {entry.objects} objects,"
                        f" expected worker {session.worker} with {session.made}"
                    )
        assert wait_until(lambda: {p.package_id for p in self.status().packages} == self.packages, 10), (
            f"{context}: packages {sorted(p.package_id for p in self.status().packages)}, at the start {self.packages}"
        )
        assert wait_until(lambda: len(descendants_of(self.daemon.pid)) == self.descendants, 30), (
            f"{context}: the daemon has {len(descendants_of(self.daemon.pid))} descendants,"
            f" {self.descendants} at the start"
        )
        # Tensors past the threshold travel in arenas: one per worker and direction, reused.
        assert wait_until(lambda: len(self.daemon_segments()) <= self.segments + 2 * WORKERS, 10), (
            f"{context}: segments {sorted(self.daemon_segments())}"
        )

    def unload(self, object_id: str) -> None:
        """Unload what a CreateMovable made (its package goes with it)."""
        self.manager.call(self.manager._stub.UnloadObject, pb.UnloadObjectRequest(object_id=object_id))


@pytest.fixture(scope="module")
def sessions_target(package_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    config = write_config(
        tmp_path_factory.mktemp("fuzz_sessions") / "config.yaml",
        package_dir,
        pool={"workers": WORKERS, "session_idle_seconds": 3600.0},
        limits={"max_sessions": MAX_SESSIONS, "max_session_objects": MAX_OBJECTS},
    )
    daemon = DaemonProcess(config).start()
    print(f"sessions fuzz seed {SEED}, {FUZZ_SECONDS:g} s")
    try:
        options = [("grpc.max_receive_message_length", MESSAGE_LIMIT), ("grpc.max_send_message_length", MESSAGE_LIMIT)]
        with (
            grpc.insecure_channel(daemon.target, options=options) as channel,
            InterpreterManager(daemon.target, timeout=CALL_TIMEOUT) as manager,
        ):
            models = manager.load_package(package_dir / "models.pt")
            echo = models.load_pickle("models", "echo.pkl")
            scale = models.load_pickle("models", "scale.pkl")
            named = models.load_pickle("models", "echo.pkl", name="fuzz-echo")
            status = manager.status()
            assert wait_until(lambda: {w.state for w in manager.status().workers} == {"idle"}, 30)
            fuzzed = Target(
                daemon,
                channel,
                manager,
                echo_id=echo.id,
                scale_id=scale.id,
                models_id=models.id,
                model_name=named.id,
                workers={worker.index: worker.pid for worker in status.workers},
                descendants=len(descendants_of(daemon.pid)),
                packages={package.package_id for package in status.packages},
                segments=0,
            )
            fuzzed.segments = len(fuzzed.daemon_segments())
            fuzzed.assert_serving("the start", [], exact=True)
            yield fuzzed
            fuzzed.assert_serving("the last test", [], exact=True)
            assert not manager.status().sessions, "every session was closed: Status must show none"
            print(f"sessions fuzz answers: {dict(sorted(fuzzed.codes.items()))}")
    finally:
        daemon.assert_clean_stop()


# ------------------------------------------------------------------ garbage and mutated bytes


def open_plain(target: Target, test: str) -> Held:
    stream, answer = target.open(pb.OpenSessionRequest().SerializeToString(), deadline=None)
    target.check(answer, {Code.OK}, "OpenSession {} for the base session", test)
    event = pb.SessionEvent.FromString(answer.response)
    return Held(event.session_id, event.worker, stream)


def step(target: Target, method: str, request: Message) -> int:
    """A step that must make an object; its number."""
    answer = target.call(method, request.SerializeToString())
    assert answer.code == Code.OK, f"{method} {request}: {answer}"
    return pb.ObjResponse.FromString(answer.response).obj_id


def base_requests(target: Target, session: Held) -> dict[str, list[bytes]]:
    """Valid serialized requests of every Sessions method on the base session, to mutate."""
    sid = session.id
    show = step(target, "Global", pb.GlobalRequest(session_id=sid, module="builtins", name="repr"))
    items = pb.Value(
        list_value=pb.ValueList(items=[pb.Value(int_value=1), pb.Value(double_value=2.5), pb.Value(string_value="x")])
    )
    listed = step(target, "FromValue", pb.FromValueRequest(session_id=sid, value=items))
    tensor = pb.Value(tensor_value=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 2], data=bytes(16)))
    tensored = step(target, "FromValue", pb.FromValueRequest(session_id=sid, value=tensor))
    negate = step(target, "Global", pb.GlobalRequest(session_id=sid, module="torch", name="neg"))
    session.made, session.next_number = 4, 5

    def ref(number: int) -> pb.Value:
        return pb.Value(obj_ref=pb.ObjRef(session_id=sid, obj_id=number))

    entries = pb.Dict(entries=[pb.DictEntry(string_key="k", value=ref(listed)), pb.DictEntry(int_key=3, value=tensor)])
    requests: dict[str, list[Message]] = {
        "OpenSession": [
            pb.OpenSessionRequest(),
            pb.OpenSessionRequest(worker=0),
            pb.OpenSessionRequest(worker=1),
            pb.OpenSessionRequest(object_id=target.echo_id),
            pb.OpenSessionRequest(object_id=target.model_name, version=1),
            pb.OpenSessionRequest(package_id=target.models_id),
        ],
        "CloseSession": [pb.CloseSessionRequest(session_id=sid)],
        "Global": [
            pb.GlobalRequest(session_id=sid, module="builtins", name="repr"),
            pb.GlobalRequest(session_id=sid, module="torch", name="neg"),
            pb.GlobalRequest(session_id=sid, module="math", name="sqrt"),
        ],
        "FromValue": [
            pb.FromValueRequest(session_id=sid, value=items),
            pb.FromValueRequest(session_id=sid, value=tensor),
            pb.FromValueRequest(session_id=sid, value=pb.Value(dict_value=entries)),
        ],
        "FromMovable": [
            pb.FromMovableRequest(session_id=sid, object_id=target.echo_id),
            pb.FromMovableRequest(session_id=sid, object_id=target.model_name, version=1),
        ],
        "Call": [
            pb.ObjCallRequest(session_id=sid, obj_id=show, args=[ref(listed)]),
            pb.ObjCallRequest(session_id=sid, obj_id=negate, args=[ref(tensored)]),
            pb.ObjCallRequest(
                session_id=sid, obj_id=tensored, method="add", args=[pb.Value(int_value=1)], kwargs={"alpha": tensor}
            ),
        ],
        "Attr": [
            pb.ObjAttrRequest(session_id=sid, obj_id=tensored, name="shape"),
            pb.ObjAttrRequest(session_id=sid, obj_id=listed, name="__len__"),
        ],
        "HasAttr": [pb.ObjAttrRequest(session_id=sid, obj_id=tensored, name="T")],
        "ToValue": [pb.ObjRequest(session_id=sid, obj_id=listed), pb.ObjRequest(session_id=sid, obj_id=tensored)],
        "CreateMovable": [
            pb.CreateMovableRequest(session_id=sid, obj=pb.ObjRef(session_id=sid, obj_id=tensored)),
            pb.CreateMovableRequest(session_id=sid, obj=pb.ObjRef(session_id=sid, obj_id=listed), name="fuzz-garbage"),
        ],
    }
    return {method: [message.SerializeToString() for message in found] for method, found in requests.items()}


REQUEST_TYPES: dict[str, type[Message]] = {
    "OpenSession": pb.OpenSessionRequest,
    "CloseSession": pb.CloseSessionRequest,
    "Global": pb.GlobalRequest,
    "FromValue": pb.FromValueRequest,
    "FromMovable": pb.FromMovableRequest,
    "Call": pb.ObjCallRequest,
    "Attr": pb.ObjAttrRequest,
    "HasAttr": pb.ObjAttrRequest,
    "ToValue": pb.ObjRequest,
    "CreateMovable": pb.CreateMovableRequest,
}


def parsed(method: str, payload: bytes) -> Message | None:
    try:
        return REQUEST_TYPES[method].FromString(payload)
    except (DecodeError, RecursionError):
        return None


def test_garbage_session_requests(sessions_target: Target) -> None:
    """Random and mutated bytes as the request of every Sessions method, on a live base session."""
    test = "test_garbage_session_requests"
    target = sessions_target
    rng = rng_for(test)
    base = open_plain(target, test)
    bases = base_requests(target, base)
    every_base = [payload for payloads in bases.values() for payload in payloads]
    sent = 0
    try:
        for number in rounds(FUZZ_SECONDS * 0.35, 20_000):
            method = rng.choice(sorted(bases))
            if rng.random() < 0.1:
                payload = rng.randbytes(rng.randint(0, 64))
            else:
                payload = mutate(rng, rng.choice(bases[method]), every_base)
            request = parsed(method, payload)
            if request is not None and not check_names_allowed(request):
                continue  # a mutation made a denied name: never sent
            what = functools.partial(words, method, request, payload)
            if method == "OpenSession":
                stream, answer = target.open(payload)
                stream.cancel()
                if answer.code == Code.OK and answer.details != NO_EVENT:
                    event = pb.SessionEvent.FromString(answer.response)
                    assert event.session_id and event.worker in target.workers, f"{what()}: event {event}"
            else:
                answer = target.call(method, payload)
            target.check(answer, PROPER, what, test)
            sent += 1
            if method == "CreateMovable" and answer.code == Code.OK:
                target.unload(pb.CreateMovableResponse.FromString(answer.response).object_id)
            if (method == "CloseSession" and answer.code == Code.OK) or number % 100 == 99:
                # The base session may be closed now (or full): every while, a fresh one.
                target.call("CloseSession", pb.CloseSessionRequest(session_id=base.id).SerializeToString())
                base.stream.cancel()
                base.ended = "closed"
                target.assert_serving(f"{number + 1} garbage requests", [base])
                base = open_plain(target, test)
                bases = base_requests(target, base)
                every_base = [payload for payloads in bases.values() for payload in payloads]
    finally:
        target.call("CloseSession", pb.CloseSessionRequest(session_id=base.id).SerializeToString())
        base.stream.cancel()
        base.ended = "closed"
    assert sent, "every mutated request was denied"
    target.assert_serving("garbage session requests", [base], exact=True)


# ------------------------------------------------------------------ random steps on real sessions


@dataclass
class Expect:
    """What the answer to a step may be."""

    codes: set[grpc.StatusCode]
    details: str = ""  # a text a FAILED_PRECONDITION answer must hold


@dataclass
class Checks:
    """What the daemon's checks of a step's objects and values find before the worker runs it."""

    definite: set[grpc.StatusCode] = field(default_factory=set)  # problems: the first one met fails the step
    maybe: set[grpc.StatusCode] = field(default_factory=set)  # what may fail it or not (a value past a limit)
    missing: bool = False  # an Obj the daemon numbered and the worker does not have: NOT_FOUND there

    def add(self, other: Checks) -> None:
        self.definite |= other.definite
        self.maybe |= other.maybe
        self.missing |= other.missing

    def value(self, valid: bool | None) -> None:
        """A value the daemon must take (True), must refuse (False), or may do either (None)."""
        if valid is False:
            self.definite.add(Code.INVALID_ARGUMENT)
        elif valid is None:
            self.maybe.add(Code.INVALID_ARGUMENT)


MAKES = ("Global", "FromValue", "FromMovable", "Call", "Attr")  # the steps that make an object


class Fuzz:
    """The fuzz's model of the daemon's sessions, and the random steps on them."""

    def __init__(self, target: Target, rng: random.Random, test: str) -> None:
        self.target = target
        self.rng = rng
        self.test = test
        self.sessions: list[Held] = []  # every session opened, the ended ones too
        self.movables = 0

    # -------------------------------------------------------------- the model

    def open(self) -> list[Held]:
        return [session for session in self.sessions if not session.ended]

    def ended(self) -> list[Held]:
        return [session for session in self.sessions if session.ended]

    def pick_session(self) -> tuple[str, Held | None]:
        """A session id to step in: mostly an open session's, sometimes an ended or unknown one."""
        kind = self.rng.random()
        if self.open() and kind < 0.86:
            session = self.rng.choice(self.open())
            return session.id, session
        if self.ended() and kind < 0.95:
            session = self.rng.choice(self.ended())
            return session.id, session
        return self.rng.choice(UNKNOWN_SESSION_IDS), None

    def session_expect(self, session: Held | None) -> Expect | None:
        """The answer of a step in an ended or unknown session; None when it is open."""
        if session is None:
            return Expect({Code.NOT_FOUND})
        if session.ended:
            return Expect({Code.FAILED_PRECONDITION}, details=f"has ended: {session.ended}")
        return None

    def number(self, session: Held | None) -> tuple[int, Checks]:
        """An object number of a session: mostly one it holds, sometimes one the daemon never gave
        (NOT_FOUND there) or one it gave to a step that failed (NOT_FOUND in the worker)."""
        if session is None:
            return self.rng.choice([1, 2, UINT64_MAX]), Checks()
        if session.objects and self.rng.random() < 0.88:
            return self.rng.choice(sorted(session.objects)), Checks()
        failed = [n for n in range(max(1, session.next_number - 64), session.next_number) if n not in session.objects]
        if failed and self.rng.random() < 0.4:
            return self.rng.choice(failed), Checks(missing=True)
        never = [0, session.next_number, session.next_number + self.rng.randint(1, 50), INT64_MAX, UINT64_MAX]
        return self.rng.choice(never), Checks({Code.NOT_FOUND})

    def ref(self, session: Held | None, session_id: str) -> tuple[pb.ObjRef, Checks]:
        """An Obj as an argument of a step in session_id: of this session, or of another one."""
        kind = self.rng.random()
        if kind < 0.8:
            number, checks = self.number(session)
            return pb.ObjRef(session_id=session_id, obj_id=number), checks
        others = [other for other in self.sessions if other.id != session_id and other.objects]
        if others and kind < 0.95:  # of another session, open or ended
            other = self.rng.choice(others)
            ref = pb.ObjRef(session_id=other.id, obj_id=self.rng.choice(sorted(other.objects)))
        else:
            ref = pb.ObjRef(session_id=self.rng.choice(UNKNOWN_SESSION_IDS), obj_id=self.rng.choice([1, 2]))
        return ref, Checks({Code.FAILED_PRECONDITION})

    def value(self, session: Held | None, session_id: str, out: pb.Value, refs: bool) -> Checks:
        """Fill out with a random value, with Objs in it when refs."""
        kind = self.rng.random()
        checks = Checks()
        if refs and kind < 0.3:
            ref, checks = self.ref(session, session_id)
            out.obj_ref.CopyFrom(ref)
        elif refs and kind < 0.4:  # Objs inside a list
            out.list_value.SetInParent()
            for _ in range(self.rng.randint(1, 3)):
                checks.add(self.value(session, session_id, out.list_value.items.add(), refs))
        elif kind < 0.65:
            choice = self.rng.random()
            if choice < 0.5:
                out.int_value = self.rng.choice(SMALL_INTS)
            elif choice < 0.8:
                out.string_value = self.rng.choice([*TEXT, "models", "echo.pkl", "f="])
            else:
                out.double_value = self.rng.choice([0.5, -1.0, 2.0])
        else:
            checks.value(random_value(self.rng, out))
        return checks

    def make_expect(self, session: Held, checks: Checks, outcomes: set[grpc.StatusCode]) -> Expect:
        """A step that makes an object, in an open session: a problem the daemon's checks find,
        else the session's object limit, else what the worker may answer."""
        if checks.definite:
            return Expect(checks.definite | checks.maybe, details="an Obj of session")
        codes = set(checks.maybe)
        if session.made >= MAX_OBJECTS:
            codes.add(Code.RESOURCE_EXHAUSTED)
        elif checks.missing:
            codes |= {Code.NOT_FOUND} | (outcomes - {Code.OK})
        else:
            codes |= outcomes
        return Expect(codes, details="an Obj of session")

    def step_expect(self, checks: Checks, outcomes: set[grpc.StatusCode]) -> Expect:
        """A step that makes nothing, in an open session."""
        if checks.definite:
            return Expect(checks.definite | checks.maybe)
        if checks.missing:
            return Expect({Code.NOT_FOUND} | checks.maybe)
        return Expect(outcomes | checks.maybe)

    # -------------------------------------------------------------- sending

    def send(self, method: str, request: Message, expect: Expect, session: Held | None) -> Answer:
        """Send a step; check its answer; keep the model up to date with what it made."""
        assert check_names_allowed(request), f"the fuzz made a denied request: {request}"
        payload = request.SerializeToString()
        if parsed(method, payload) is None:
            expect = Expect({Code.INVALID_ARGUMENT})  # a value nested past protobuf's limit: no request at all
        answer = self.target.call(method, payload)
        what = functools.partial(words, method, request, payload)
        self.target.check(answer, expect.codes, what, self.test, expect.details, method)
        if method in MAKES and session is not None and not session.ended:
            self.numbered(session, method, answer, what)
        return answer

    def numbered(self, session: Held, method: str, answer: Answer, what: Callable[[], str]) -> None:
        """After a step that makes an object: the number it took, and the object if it made one."""
        if answer.code == Code.OK:
            response = pb.ObjResponse.FromString(answer.response)
            assert (response.session_id, response.obj_id) == (session.id, session.next_number), (
                f"{what()}\n  answered {response}, expected object {session.next_number} of session {session.id}"
                f"\n  {replay_hint(self.test)}"
            )
            assert response.type_name, f"{what()}\n  answered {response}: no type"
            session.objects[response.obj_id] = response.type_name
            session.made += 1
            session.next_number += 1
        elif answer.code == Code.UNKNOWN or (answer.code == Code.NOT_FOUND and "in this worker" in answer.details):
            session.next_number += 1  # the worker ran it: its number is taken

    def touched(self, session: Held | None, *numbers: int) -> None:
        """Objects a step may have changed, or made an alias of: their value is no longer known."""
        if session is not None:
            for number in numbers:
                session.values.pop(number, None)

    # -------------------------------------------------------------- the steps

    def step_global(self) -> None:
        session_id, session = self.pick_session()
        kind = self.rng.random()
        if kind < 0.65:
            module, name = self.rng.choice(SANE_GLOBALS)
        elif kind < 0.85:
            module, name = self.rng.choice(INSANE_GLOBALS)
        elif kind < 0.97:
            module, name = self.rng.choice(SANE_GLOBALS)
            module, name = self.misspelt(module), self.misspelt(name)
        else:
            module, name = self.rng.choice(LONG_GLOBALS)
        if denied_global(module, name):
            return
        request = pb.GlobalRequest(session_id=session_id, module=module, name=name)
        expect = self.session_expect(session)
        if expect is None:
            assert session is not None
            checks = Checks({Code.INVALID_ARGUMENT} if not module or not name else set())
            expect = self.make_expect(session, checks, {Code.OK, Code.UNKNOWN})
        self.send("Global", request, expect, session)

    def misspelt(self, text: str) -> str:
        chars = list(text)
        for _ in range(self.rng.randint(1, 2)):
            position = self.rng.randrange(len(chars) + 1)
            letter = self.rng.choice("abcdefghijklmnopqrstuvwxyz_.")
            if chars and self.rng.random() < 0.5:
                chars[min(position, len(chars) - 1)] = letter
            else:
                chars.insert(position, letter)
        return "".join(chars)

    def step_from_value(self) -> None:
        session_id, session = self.pick_session()
        request = pb.FromValueRequest(session_id=session_id)
        checks = self.value(session, session_id, request.value, refs=self.rng.random() < 0.4)
        expect = self.session_expect(session)
        if expect is None:
            assert session is not None
            expect = self.make_expect(session, checks, {Code.OK, Code.UNKNOWN})
        number = session.next_number if session is not None else 0
        answer = self.send("FromValue", request, expect, session)
        refs = list(refs_in(request, session_id))
        self.touched(session, *refs)
        plain = not refs and not checks.maybe and "dict_value" not in str(request.value)  # a repeated key keeps one
        if answer.code == Code.OK and session is not None and plain:
            session.values[number] = request.value.SerializeToString()

    def sensible(self, session: Held | None) -> tuple[int, str] | None:
        """An object of the session and a name it has (or "" for a callable), if the fuzz knows one."""
        if session is None or not session.objects:
            return None
        number = self.rng.choice(sorted(session.objects))
        type_name = session.objects[number]
        names = attrs_of(type_name)
        callable_ = type_name.endswith(CALLABLE_TYPES)
        if not names and not callable_:
            return None
        return number, "" if callable_ and (not names or self.rng.random() < 0.5) else self.rng.choice(names)

    def sensible_value(self, session: Held | None, session_id: str, out: pb.Value) -> Checks:
        """An argument a sensible call may well take: an object of the session, or a small value."""
        if session is not None and session.objects and self.rng.random() < 0.4:
            out.obj_ref.CopyFrom(pb.ObjRef(session_id=session_id, obj_id=self.rng.choice(sorted(session.objects))))
            return Checks()
        choice = self.rng.random()
        if choice < 0.5:
            out.int_value = self.rng.choice(SMALL_INTS)
        elif choice < 0.7:
            out.double_value = self.rng.choice([0.5, -1.0, 2.0])
        elif choice < 0.85:
            out.string_value = self.rng.choice(["x", "f=", "models", "é"])
        else:
            out.tensor_value.CopyFrom(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=bytes(8)))
        return Checks()

    def step_call(self) -> None:
        session_id, session = self.pick_session()
        picked = self.sensible(session) if self.rng.random() < 0.5 else None
        if picked is not None:
            (number, method), checks = picked, Checks()
        else:
            number, checks = self.number(session)
            method = "" if self.rng.random() < 0.45 else self.rng.choice(ATTR_NAMES)
        if denied_attr(method):
            return
        request = pb.ObjCallRequest(session_id=session_id, obj_id=number, method=method)
        arguments = Checks()
        if method in ("load_pickle", "load_text", "load_binary") and self.rng.random() < 0.7:
            request.args.extend(pb.Value(string_value=text) for text in self.rng.choice(PACKAGE_ARGS))
        elif picked is not None:
            for _ in range(self.rng.choice([0, 1, 1, 2])):
                arguments.add(self.sensible_value(session, session_id, request.args.add()))
        else:
            for _ in range(self.rng.choice([0, 1, 1, 2, 3])):
                arguments.add(self.value(session, session_id, request.args.add(), refs=True))
            for name in self.rng.sample(KWARG_NAMES, self.rng.choice([0, 0, 0, 1, 2])):
                arguments.add(self.value(session, session_id, request.kwargs[name], refs=True))
        expect = self.session_expect(session)
        if expect is None:
            assert session is not None
            if checks.definite:  # the target is checked first
                expect = Expect(checks.definite)
            else:
                arguments.missing |= checks.missing
                expect = self.make_expect(session, arguments, {Code.OK, Code.UNKNOWN})
        self.send("Call", request, expect, session)
        # What the call changed, or what its result may alias and change later.
        self.touched(session, number, *refs_in(request, session_id))

    def step_attr(self, method: str) -> None:
        session_id, session = self.pick_session()
        picked = self.sensible(session) if self.rng.random() < 0.5 else None
        if picked is not None and picked[1]:
            (number, name), checks = picked, Checks()
        else:
            number, checks = self.number(session)
            name = self.rng.choice([*ATTR_NAMES, LONG_NAME]) if self.rng.random() < 0.98 else self.misspelt("shape")
        if denied_attr(name):
            return
        request = pb.ObjAttrRequest(session_id=session_id, obj_id=number, name=name)
        expect = self.session_expect(session)
        if expect is None:
            assert session is not None
            if method == "Attr":
                expect = self.make_expect(session, checks, {Code.OK, Code.UNKNOWN})
            else:
                expect = self.step_expect(checks, {Code.OK, Code.UNKNOWN})
        answer = self.send(method, request, expect, session)
        self.touched(session, number)  # an attribute may alias the object (a tensor's .data)
        if method == "HasAttr" and answer.code == Code.OK and name == "":
            assert not pb.HasAttrResponse.FromString(answer.response).present, f"HasAttr of '': {request}"

    def step_to_value(self) -> None:
        session_id, session = self.pick_session()
        number, checks = self.number(session)
        request = pb.ObjRequest(session_id=session_id, obj_id=number)
        expect = self.session_expect(session) or self.step_expect(
            checks, {Code.OK, Code.INVALID_ARGUMENT, Code.UNKNOWN}
        )
        answer = self.send("ToValue", request, expect, session)
        if answer.code == Code.OK and session is not None and number in session.values:
            value = pb.ObjValueResponse.FromString(answer.response).value.SerializeToString()
            assert value == session.values[number], (
                f"ToValue {request}: the value changed from {session.values[number].hex()} to {value.hex()}"
                f"\n  {replay_hint(self.test)}"
            )

    def step_from_movable(self) -> None:
        session_id, session = self.pick_session()
        kind = self.rng.random()
        version = 0
        if kind < 0.35:
            object_id = self.rng.choice([self.target.echo_id, self.target.scale_id])
        elif kind < 0.6:
            object_id, version = self.target.model_name, self.rng.choice([0, 1])
        else:
            object_id = self.rng.choice([*FROM_MOVABLE_TARGETS, self.target.model_name, self.target.echo_id])
            version = self.rng.choice([0, 2, -1, INT64_MAX, INT64_MIN])
        known = object_id in (self.target.echo_id, self.target.scale_id, self.target.model_name)
        valid = known and (version == 0 or (object_id == self.target.model_name and version == 1))
        request = pb.FromMovableRequest(session_id=session_id, object_id=object_id, version=version)
        expect = self.session_expect(session)
        if expect is None:
            assert session is not None
            checks = Checks() if valid else Checks({Code.NOT_FOUND, Code.INVALID_ARGUMENT})
            expect = self.make_expect(session, checks, {Code.OK})
        self.send("FromMovable", request, expect, session)

    def step_create_movable(self) -> None:
        session_id, session = self.pick_session()
        if self.rng.random() < 0.8:
            number, checks = self.number(session)
            ref = pb.ObjRef(session_id=session_id, obj_id=number)
        else:
            ref, checks = self.ref(session, session_id)
        naming = self.rng.random()
        bad_name = naming >= 0.85
        if naming < 0.6:
            name = ""
        elif not bad_name:
            name = f"fuzz-movable-{self.rng.randint(0, 2)}"
        else:
            name = self.rng.choice(MOVABLE_NAMES_BAD)
        request = pb.CreateMovableRequest(session_id=session_id, obj=ref, name=name)
        expect = self.session_expect(session)
        if expect is None:
            if ref.session_id != session_id:
                expect = Expect({Code.FAILED_PRECONDITION}, details="Cannot create movable from an object")
            elif checks.definite:
                expect = Expect(checks.definite)
            elif bad_name:
                expect = Expect({Code.INVALID_ARGUMENT})
            else:
                expect = self.step_expect(checks, {Code.OK, Code.INVALID_ARGUMENT, Code.UNKNOWN})
        answer = self.send("CreateMovable", request, expect, session)
        if answer.code == Code.OK:
            response = pb.CreateMovableResponse.FromString(answer.response)
            assert response.object_id.startswith("obj-") and response.package_id, f"{request}: {response}"
            assert response.name == name and (response.version >= 1) == bool(name), f"{request}: {response}"
            self.movables += 1
            self.target.unload(response.object_id)

    def step_close(self) -> None:
        session_id, session = self.pick_session()
        request = pb.CloseSessionRequest(session_id=session_id)
        expect = self.session_expect(session) or Expect({Code.OK})
        answer = self.send("CloseSession", request, expect, session)
        if answer.code == Code.OK and session is not None:
            session.ended = "closed by its client"
            assert wait_until(lambda: session.stream.done(), 10), f"{request}: its stream did not end"
            session.stream.cancel()

    def step_cancel(self) -> None:
        """The client goes away: its stream is cancelled, and with it the session."""
        if not self.open():
            return
        session = self.rng.choice(self.open())
        session.stream.cancel()
        session.ended = "its OpenSession stream ended"
        assert wait_until(lambda: session.id not in {s.session_id for s in self.target.status().sessions}, 10), (
            f"session {session.id}: its stream was cancelled 10 s ago, Status still shows it"
            f"\n  {replay_hint(self.test)}"
        )

    def step_open(self) -> None:
        kind = self.rng.random()
        request = pb.OpenSessionRequest()
        self_kind = ""
        bad_self = False
        if kind < 0.3:
            pass
        elif kind < 0.5:
            request.worker = self.rng.randrange(WORKERS)
        elif kind < 0.55:
            request.worker = self.rng.choice([-1, WORKERS, WORKERS + 1, 99, INT32_MAX, INT32_MIN])
        elif kind < 0.7:
            choices = [(self.target.echo_id, "Echo"), (self.target.scale_id, "Scale")]
            request.object_id, self_kind = self.rng.choice(choices)
        elif kind < 0.8:
            request.object_id, request.version, self_kind = self.target.model_name, self.rng.choice([0, 1]), "Echo"
        elif kind < 0.9:
            request.package_id, self_kind = self.target.models_id, "PackageImporter"
        elif kind < 0.95:
            bad_self = True
            choice = self.rng.random()
            if choice < 0.3:
                request.object_id = self.rng.choice(["nope", "obj-0123456789abcdef", "a" * 300])
            elif choice < 0.5:
                request.package_id = self.rng.choice(["nope", "0" * 64])
            elif choice < 0.75:
                request.object_id, request.version = self.target.model_name, self.rng.choice([2, -1, INT64_MAX])
            else:
                request.object_id, request.version = self.target.echo_id, self.rng.choice([1, -1])
        else:
            request.object_id, request.package_id = self.target.echo_id, self.target.models_id
        if self.rng.random() < 0.1 and not request.HasField("worker"):
            request.worker = self.rng.randrange(WORKERS)
        out_of_range = request.HasField("worker") and request.worker not in range(WORKERS)
        if request.object_id and request.package_id:
            expect = Expect({Code.INVALID_ARGUMENT})
        elif len(self.open()) >= MAX_SESSIONS:
            expect = Expect({Code.RESOURCE_EXHAUSTED})
        elif out_of_range:  # a fix: NOT_FOUND or INVALID_ARGUMENT
            expect = Expect({Code.INVALID_ARGUMENT, Code.NOT_FOUND})
        elif bad_self:
            expect = Expect({Code.NOT_FOUND, Code.INVALID_ARGUMENT})
        else:
            expect = Expect({Code.OK})
        payload = request.SerializeToString()
        stream, answer = self.target.open(payload, deadline=None)
        what = functools.partial(words, "OpenSession", request, payload)
        try:
            self.target.check(answer, expect.codes, what, self.test, method="OpenSession")
        except AssertionError:
            stream.cancel()  # a session opened when it should not have: it ends with this test
            raise
        if answer.code != Code.OK:
            stream.cancel()
            return
        event = pb.SessionEvent.FromString(answer.response)
        assert event.session_id and event.session_id not in {s.id for s in self.sessions}, f"{what()}: {event}"
        assert self.target.workers.get(event.worker) == event.worker_pid, f"{what()}: {event}"
        if request.HasField("worker"):
            assert event.worker == request.worker, f"{what()}: {event}"
        held = Held(event.session_id, event.worker, stream)
        self.sessions.append(held)
        assert event.HasField("self") == bool(self_kind), f"{what()}: {event}"
        if self_kind:
            assert (event.self.session_id, event.self.obj_id) == (held.id, 1), f"{what()}: {event}"
            assert self_kind in event.self.type_name, f"{what()}: {event}"
            held.objects[1] = event.self.type_name
            held.made, held.next_number = 1, 2

    def close_all(self) -> None:
        for session in self.open():
            answer = self.target.call("CloseSession", pb.CloseSessionRequest(session_id=session.id).SerializeToString())
            assert answer.code == Code.OK, f"CloseSession of {session.id}: {answer}"
            session.ended = "closed by its client"
        for session in self.sessions:
            session.stream.cancel()

    def run_step(self) -> None:
        steps: list[tuple[float, Callable[[], None]]] = [
            (4, self.step_open),
            (8, self.step_global),
            (8, self.step_from_value),
            (14, self.step_call),
            (5, lambda: self.step_attr("Attr")),
            (5, lambda: self.step_attr("HasAttr")),
            (7, self.step_to_value),
            (2, self.step_from_movable),
            (1, self.step_create_movable),
            (2, self.step_close),
            (0.7, self.step_cancel),
        ]
        if not self.open():
            self.step_open()
            return
        self.rng.choices([run for _, run in steps], [weight for weight, _ in steps])[0]()


def test_random_session_steps(sessions_target: Target) -> None:
    """Random well-formed steps on real sessions, each answer as the model of the daemon predicts."""
    test = "test_random_session_steps"
    rng = rng_for(test)
    fuzz = Fuzz(sessions_target, rng, test)
    steps = 0
    try:
        for number in rounds(FUZZ_SECONDS * 0.65, 2_000):
            for _ in range(40):
                fuzz.run_step()
                steps += 1
            sessions_target.assert_serving(f"round {number} ({steps} steps)", fuzz.sessions, exact=True)
    finally:
        fuzz.close_all()
    sessions_target.assert_serving("random session steps", fuzz.sessions, exact=True)
    assert not sessions_target.status().sessions, "every session was closed: Status must show none"
    print(f"sessions fuzz: {steps} steps, {len(fuzz.sessions)} sessions, {fuzz.movables} movables")


# ------------------------------------------------------------------ found by the fuzz


@pytest.mark.parametrize("slot", [WORKERS, -1, INT32_MAX])
def test_a_worker_slot_outside_the_pool_is_not_unavailable(sessions_target: Target, slot: int) -> None:
    """OpenSession(worker=N) for a slot the pool does not have can never succeed: UNAVAILABLE
    tells a client to retry (gRPC's retry policies do so by themselves). A slot that exists but
    whose worker is restarting is UNAVAILABLE rightly; one outside 0..size-1 is a bad argument."""
    stream, answer = sessions_target.open(pb.OpenSessionRequest(worker=slot).SerializeToString())
    stream.cancel()
    assert answer.code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND), f"OpenSession(worker={slot}): got {answer}"


@pytest.mark.parametrize(
    ("module", "name"), [("builtins", LONG_NAME), (LONG_NAME, "x")], ids=["long-name", "long-module"]
)
def test_a_long_name_in_a_steps_error_reaches_the_client(sessions_target: Target, module: str, name: str) -> None:
    """Global(module, name) of a name that is not there: UNKNOWN with the remote AttributeError
    (ModuleNotFoundError). The status message is cut to 2000 bytes, but the traceback in the
    deployd-error-detail-bin trailer is not: it quotes the 20000-character name, over grpc's
    metadata limit, and the client gets RESOURCE_EXHAUSTED ("received metadata size exceeds
    ... limit") and no error. A model's exception with a long message (Invoke) goes the same way."""
    target = sessions_target
    session = open_plain(target, "test_a_long_name_in_a_steps_error_reaches_the_client")
    try:
        request = pb.GlobalRequest(session_id=session.id, module=module, name=name)
        answer = target.call("Global", request.SerializeToString())
    finally:
        target.call("CloseSession", pb.CloseSessionRequest(session_id=session.id).SerializeToString())
        session.stream.cancel()
    assert answer.code == Code.UNKNOWN and answer.remote_type in ("AttributeError", "ModuleNotFoundError"), (
        f"Global {module[:20]}.../{name[:20]}...: got {answer}"
    )


def test_the_name_lists_ask_for_nothing_denied() -> None:
    """The fuzz's own lists: every Global it names (sane, insane, long) and every attribute it asks
    for passes the denylist (a name that does not is never sent, and would only go untested)."""
    assert not [pair for pair in [*SANE_GLOBALS, *INSANE_GLOBALS, *LONG_GLOBALS] if denied_global(*pair)]
    assert not [name for name in [*ATTR_NAMES, *KWARG_NAMES] if denied_attr(name)]
    assert denied_global("os", "getpid") and denied_global("os.path", "join") and denied_global("builtins", "exit")
    assert denied_global("time", "sleep") and denied_global("builtins", "input") and denied_attr("exit_now")
