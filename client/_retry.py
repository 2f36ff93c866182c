"""When and how long to wait before a failed call is sent again."""

from __future__ import annotations

import random
from dataclasses import dataclass

from client._errors import DeployError, UnavailableError


@dataclass(frozen=True)
class Retry:
    """Send a call again when it failed with UNAVAILABLE: its worker was killed from outside,
    or the daemon was briefly unreachable. Off unless given to InterpreterManager(retry=)
    or obj.options(retry=).

    A call that killed its own worker (a crash, an exit, the memory limit) is never sent
    again: the daemon marks it (DeployError.call_killed_worker), since every retry would
    kill one more worker. Retries share the call's timeout; they never extend it.

    attempts: tries in all, the first included.
    backoff_seconds: the wait before the first retry; it doubles with each retry, up to
        max_backoff_seconds, and each wait is drawn between half of it and all of it, so
        that callers failed by one crash do not all come back at the same instant.
    """

    attempts: int = 3
    backoff_seconds: float = 0.05
    max_backoff_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Retry.attempts must be at least 1, got {self.attempts}")
        if self.backoff_seconds < 0 or self.max_backoff_seconds < 0:
            raise ValueError("Retry backoffs must not be negative")

    def should_retry(self, error: DeployError, attempt: int) -> bool:
        """Whether to try again after `attempt` tries (1 for the first) ended in error."""
        return attempt < self.attempts and isinstance(error, UnavailableError) and not error.call_killed_worker

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after try number `attempt` failed."""
        ceiling = min(self.backoff_seconds * 2 ** (attempt - 1), self.max_backoff_seconds)
        return random.uniform(ceiling / 2, ceiling)
