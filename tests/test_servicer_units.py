"""The servicer's call wrapper as a unit: what it does on the event loop for every call.

The wire behaviour (statuses, messages, metrics over real gRPC) is in test_operations.py
and test_errors.py; these check what a real daemon cannot show directly.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deployd_wire.proto import deployd_pb2 as pb
from server.api.calls import MalformedRequest, _parse_or_mark, _serialize_counted
from server.api.deployd_v1 import _reports_errors
from server.api.metrics import Metrics
from server.errors import NotFound


class Tripwire:
    """A message that fails the test if anything serializes it to learn its size."""

    object_id = "obj-tripwire"

    def ByteSize(self) -> int:
        raise AssertionError("a message was serialized again on the event loop just to count its bytes")


class Context:
    """The little of a grpc.aio servicer context the wrapper uses."""

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")

    def add_done_callback(self, callback: Any) -> None:
        pass

    def time_remaining(self) -> float | None:
        return None  # no deadline


class Servicer:
    def __init__(self) -> None:
        self._metrics = Metrics()
        self._log_calls = False

    @_reports_errors
    async def Invoke(self, request: Any, context: Any) -> Any:
        return Tripwire()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name}{labels}"
    return value


def test_the_wrapper_never_serializes_a_message_to_count_it() -> None:
    """Before: request.ByteSize() and response.ByteSize() on every call, each a full
    serialization (~3 ms for 16 MiB with upb) during which no other call moved."""
    servicer = Servicer()
    response = asyncio.run(servicer.Invoke(Tripwire(), Context()))
    assert isinstance(response, Tripwire)
    assert (
        sample(
            servicer._metrics, "deployd_calls_total", method="Invoke", model="obj-tripwire", code="OK", protocol="grpc"
        )
        == 1
    )


def test_bytes_are_counted_from_what_grpc_holds() -> None:
    metrics = Metrics()
    parse = _parse_or_mark(pb.InvokeRequest.FromString, "deployd.v1.InvokeRequest", metrics)
    serialize = _serialize_counted(pb.InvokeResponse.SerializeToString, metrics)
    raw = pb.InvokeRequest(object_id="obj", method="forward").SerializeToString()
    assert parse(raw) == pb.InvokeRequest(object_id="obj", method="forward")
    sent = serialize(pb.InvokeResponse(result=pb.Value(string_value="x" * 100)))
    assert sample(metrics, "deployd_message_bytes_total", direction="received", protocol="grpc") == len(raw)
    assert sample(metrics, "deployd_message_bytes_total", direction="sent", protocol="grpc") == len(sent)
    malformed = parse(b"\x0a\x02\xff\xfe")
    assert isinstance(malformed, MalformedRequest)
    assert "not valid UTF-8" in malformed.describe()
    assert sample(metrics, "deployd_message_bytes_total", direction="received", protocol="grpc") == len(raw) + 4


class Refuser(Servicer):
    @_reports_errors
    async def Invoke(self, request: Any, context: Any) -> Any:
        raise NotFound(f"no model {request.object_id!r} is loaded")


class AbortingContext(Context):
    async def abort(self, code: Any, details: str) -> None:
        self.aborted = (code, details)
        raise RuntimeError("aborted")


def test_unknown_names_make_no_metric_series_and_long_ones_are_cut() -> None:
    """Every caller's typo would otherwise be a series for good; a name past grpc's metadata
    limit would turn the error into the client's RESOURCE_EXHAUSTED."""
    servicer = Refuser()
    for name in ("typo-1", "typo-2", "é" * 20_000):
        context = AbortingContext()
        request = pb.InvokeRequest(object_id=name)
        with pytest.raises(RuntimeError, match="aborted"):
            asyncio.run(servicer.Invoke(request, context))
        code, details = context.aborted
        assert code.name == "NOT_FOUND" and len(details.encode()) <= 2000
    assert details.endswith("(cut: 40021 bytes)")  # "no model '" + 40000 + "' is loaded"
    assert (
        sample(servicer._metrics, "deployd_calls_total", method="Invoke", model="", code="NOT_FOUND", protocol="grpc")
        == 3
    )
    exported = servicer._metrics.registry.collect()
    assert not any("typo" in str(metric.samples) for metric in exported)


def test_health_forgets_all_but_the_latest_unloaded_names() -> None:
    """Unloaded names report SERVICE_UNKNOWN, but only the latest 1024: a daemon that loads and
    unloads for months must not keep every name it ever served."""
    import asyncio

    from grpc_health.v1 import health_pb2

    from server.api.health import _REMEMBERED_GONE, Health

    async def run() -> None:
        health = Health("deployd.v1.Deployd")
        for number in range(_REMEMBERED_GONE + 50):
            await health.sync(True, {f"obj-{number}"}, True)
        await health.sync(True, set(), True)
        table = health.servicer._server_status
        unloaded = [name for name in table if name.startswith("obj-")]
        assert len(unloaded) == _REMEMBERED_GONE
        assert table[f"obj-{_REMEMBERED_GONE + 49}"] == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        assert "obj-0" not in table, "the oldest is forgotten (NOT_FOUND, as a name never loaded)"
        await health.sync(True, {"obj-0"}, True)  # loaded again: serving, and no longer "gone"
        assert table["obj-0"] == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(run())
