"""The client's retry policy, as a unit: which errors it retries and how long it waits."""

from __future__ import annotations

import grpc
import pytest

from client import DeployError, RemoteError, ResourceExhaustedError, Retry, UnavailableError


def unavailable(call_killed_worker: bool = False) -> UnavailableError:
    return UnavailableError(grpc.StatusCode.UNAVAILABLE, "worker died", call_killed_worker=call_killed_worker)


def test_only_unavailable_calls_that_did_not_kill_their_worker_are_retried() -> None:
    retry = Retry(attempts=3)
    assert retry.should_retry(unavailable(), 1)
    assert retry.should_retry(unavailable(), 2)
    assert not retry.should_retry(unavailable(), 3), "three attempts in all"
    assert not retry.should_retry(unavailable(call_killed_worker=True), 1)
    assert not retry.should_retry(RemoteError(grpc.StatusCode.UNKNOWN, "model raised"), 1)
    assert not retry.should_retry(ResourceExhaustedError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"), 1)
    assert not retry.should_retry(DeployError(grpc.StatusCode.INTERNAL, "bug"), 1)


def test_backoff_doubles_up_to_its_ceiling_with_jitter() -> None:
    retry = Retry(attempts=10, backoff_seconds=0.1, max_backoff_seconds=0.5)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        waits = [retry.backoff(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits)
        assert len(set(waits)) > 1, "waits are jittered"


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"backoff_seconds": -1}, {"max_backoff_seconds": -1}])
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Retry(**kwargs)  # type: ignore[arg-type]
