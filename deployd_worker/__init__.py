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
model then shares the worker's own copy, the one the worker tells of each call. It imports
nothing but the standard library.
"""

from deployd_worker._call import Cancelled, cancelled, check, deadline

__all__ = ["Cancelled", "cancelled", "check", "deadline"]
