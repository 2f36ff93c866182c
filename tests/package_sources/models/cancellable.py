"""A model that stops when its caller is gone: the deployd_worker pattern (README).

Its exporter externs deployd_worker (tests/package_builder.py), so the model asks the copy
the worker tells of each call; run as plain Python, the same code never sees a cancellation.
"""

import os
import time

import deployd_worker


class Patient:
    """Works until its caller is gone."""

    def __init__(self):
        self.last = None  # what the last call saw

    def until_cancelled(self, limit):
        """Works until its caller is gone (or limit seconds pass), notes what it saw, then
        raises deployd_worker.Cancelled: the caller's status says why it stopped, even if
        its answer could still have reached it."""
        started = time.time()
        while not deployd_worker.cancelled() and time.time() - started < limit:
            pass
        self.last = {
            "cancelled": deployd_worker.cancelled(),
            "ran": time.time() - started,
            "started": started,
            "deadline": deployd_worker.deadline(),
            "pid": os.getpid(),
        }
        deployd_worker.check()
        return self.last

    def __call__(self, x):
        """until_cancelled for a KServe v2 caller (a tensor in, the same tensor out)."""
        self.until_cancelled(60)
        return x

    def last_call(self):
        return self.last

    def now(self):
        """What a call sees when its caller is still there."""
        return {"cancelled": deployd_worker.cancelled(), "deadline": deployd_worker.deadline(), "pid": os.getpid()}
