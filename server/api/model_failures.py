"""A model's exception told whole, once: the daemon's log gets its whole traceback under the
call's id, and the caller's answer, cut to fit gRPC metadata or an HTTP body, names that id.

    call id 5f2c: Invoke 'seed' raised ValueError: the whole traceback follows
      | Traceback (most recent call last):
      |   File "<torch_package_0>.models/seed.py", line 12, in forward
      | ValueError: ...

The id is the caller's x-request-id when it sent one (so its own logs and ours meet), else
one made up here; the per-call log line carries the same id. Every line of the traceback is
indented with "| ", so that text a model put in its exception can never pass for a log line.
"""

from __future__ import annotations

import logging
import secrets

from server.errors import DeploydError

failures_log = logging.getLogger("deployd.models")

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID = 64  # characters of a caller's request id kept


def new_call_id() -> str:
    return secrets.token_hex(6)


def caller_request_id(metadata: object) -> str:
    """The x-request-id a gRPC caller sent ("" when none), cut to MAX_REQUEST_ID."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == REQUEST_ID_KEY:
            return str(value)[:MAX_REQUEST_ID]
    return ""


def where_it_is(call_id: str) -> str:
    """What an answer says after a cut traceback."""
    return f"call id {call_id}: the whole traceback is in the daemon's log"


def log_whole_traceback(call_id: str, method: str, target: str, error: DeploydError) -> None:
    """Log error's remote traceback (the model's) whole, once, under call_id."""
    if not error.remote_traceback:
        return
    quoted = "\n".join("  | " + line for line in error.remote_traceback.rstrip().splitlines())
    fields = {"call_id": call_id, "method": method, "object": target, "error_type": error.remote_type}
    failures_log.warning(
        "call id %s: %s %r raised %s: the whole traceback follows\n%s",
        call_id,
        method,
        target,
        error.remote_type or type(error).__name__,
        quoted,
        extra={"fields": fields},
    )
