"""What model code may ask of the deployd worker that runs it: is the call's caller still
there, and when is its deadline. Long work can then stop early, instead of running on for
nobody until the daemon kills the worker (pool.abandoned_call_grace_seconds).

    import deployd_worker

    def forward(self, x):
        for step in range(self.steps):
            deployd_worker.check()  # raises deployd_worker.Cancelled once the caller is gone
            x = self.refine(x)
        return x

- `cancelled()`: True once the caller of the running call is gone: its deadline passed, or
  it cancelled the call (daemon path) or hung up (HTTP). Cheap enough for a tight loop: a
  clock read and one word of shared memory.
- `deadline()`: the running call's deadline as a `time.time()` timestamp; None without one.
- `check()`: raises `Cancelled` once `cancelled()` is True; the caller's status is then
  DEADLINE_EXCEEDED or CANCELLED, and the worker goes on serving.

Outside a worker (plain Python, a notebook, a unit test) there is no call: `cancelled()` is
False, `deadline()` None and `check()` does nothing, so the same model code runs anywhere.

In a torch.package archive, extern this module (`exporter.extern("deployd_worker")`): the
model then shares the worker's own copy, the one the worker tells of each call. A copy the
exporter interned (`intern("**")`) answers with the worker's copy too, where there is one.
It imports nothing but the standard library.
"""

import importlib

from deployd_worker._call import Cancelled, cancelled, check, deadline

# An interned copy has a mangled name ("<torch_package_0>.deployd_worker") and state of its
# own, which no worker tells of any call: it hands out the worker's copy's functions instead.
# (importlib, not sys: torch.package refuses to package code that imports sys.)
if __name__ != "deployd_worker":
    try:
        _worker_copy = importlib.import_module("deployd_worker")
    except ImportError:  # deployd is not installed here: no worker, no call
        pass
    else:
        Cancelled = _worker_copy.Cancelled  # type: ignore[misc]
        cancelled, check, deadline = _worker_copy.cancelled, _worker_copy.check, _worker_copy.deadline

__all__ = ["Cancelled", "cancelled", "check", "deadline"]
