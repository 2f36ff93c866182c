"""Which asyncio event loop runs the daemon: uvloop where installed ("auto"), or asyncio's own.

uvloop roughly halves the loop's own cost per wake-up; the daemon wakes at least twice a
call (the gRPC request, the worker's reply), so it shows in every call's latency.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

Result = TypeVar("Result")
CHOICES = ("auto", "asyncio", "uvloop")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio" or (choice == "auto" and importlib.util.find_spec("uvloop") is None):
        return None
    import uvloop

    return uvloop.new_event_loop  # type: ignore[no-any-return]


def run(main: Coroutine[Any, Any, Result], choice: str = "auto") -> Result:
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
