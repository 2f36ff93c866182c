"""Records every call of torch.cuda's device functions, with the caller's pid (tests/test_gpus.py).

On PYTHONPATH with DEPLOYD_CUDA_PROBE set to a file, each process that imports torch.cuda (the
fork server, the workers it forks, the daemon if it ever did) appends "PID NAME" to that file for
each call of a function that would start CUDA or ask the driver for devices. Forking after one
of those breaks CUDA in the child, so only workers may appear in the file.
"""

import importlib.abc
import importlib.util
import os
import sys

_WATCHED = ("_lazy_init", "init", "is_available", "device_count", "current_device", "mem_get_info", "set_device")


def _record(path, name, function):
    def probed(*args, **kwargs):
        with open(path, "a") as log:
            log.write(f"{os.getpid()} {name}\n")
        return function(*args, **kwargs)

    probed.__wrapped__ = function
    return probed


class _TorchCudaProbe(importlib.abc.MetaPathFinder):
    def __init__(self, path):
        self.path = path

    def find_spec(self, name, import_path, target=None):
        if name != "torch.cuda":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module
        path = self.path

        def exec_module(module):
            execute(module)
            for watched in _WATCHED:
                function = getattr(module, watched, None)
                if callable(function):
                    setattr(module, watched, _record(path, watched, function))

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("DEPLOYD_CUDA_PROBE"):
    sys.meta_path.insert(0, _TorchCudaProbe(os.environ["DEPLOYD_CUDA_PROBE"]))
