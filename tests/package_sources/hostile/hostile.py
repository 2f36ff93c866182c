"""A model that tests the worker's limits (packaged by tests/test_limits.py)."""

import os
import resource


class Hostile:
    def open_files(self, count):
        """Open count files at once; returns how many it held."""
        held = []
        try:
            for _ in range(count):
                held.append(open(os.devnull, "rb"))  # noqa: SIM115 (held open on purpose)
            return len(held)
        finally:
            for file in held:
                file.close()

    def allocate(self, size):
        return len(bytearray(size))

    def allocate_tensor(self, size):
        import torch

        return torch.ones(size, dtype=torch.uint8).numel()

    def rlimits(self):
        return [list(resource.getrlimit(resource.RLIMIT_NOFILE)), list(resource.getrlimit(resource.RLIMIT_AS))]

    def ids(self):
        return [os.getuid(), os.geteuid(), os.getgid(), os.getegid()]

    def environ(self, name):
        return os.environ.get(name, "")

    def echo(self, value):
        return value
