"""A model that stops when its caller is gone: the deployd_worker pattern (README).

Its exporter externs deployd_worker (tests/package_builder.py), so the model asks the copy
the worker tells of each call; run as plain Python, the same code never sees a cancellation.
"""

import os
import time

import deployd_worker


class Patient:
    """Works until its caller is gone, or `limit` seconds have passed."""

    def __init__(self):
        self.last = None  # what the last call saw

    def until_cancelled(self, limit):
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
        return self.last

    def until_checked(self, limit):
        """The same, stopping by deployd_worker.check(): the caller's status says why."""
        started = time.time()
        while time.time() - started < limit:
            deployd_worker.check()
        return "ran out"

    def last_call(self):
        return self.last

    def now(self):
        """What a call sees when its caller is still there."""
        return {"cancelled": deployd_worker.cancelled(), "deadline": deployd_worker.deadline(), "pid": os.getpid()}
