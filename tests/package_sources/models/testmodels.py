"""Objects the tests package with torch.package (built by tests/package_builder.py)."""

import importlib
import os
import time

import numpy
import torch


class Echo:
    """Returns what it was given: the round trip of every wire value."""

    def __call__(self, value):
        return value

    def pair(self, *args, **kwargs):
        return args, kwargs


class Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = torch.nn.Parameter(torch.tensor(factor))
        self.calls = 0

    def forward(self, x, offset=0.0, *, negate=False):
        self.calls += 1
        y = x * self.factor + offset
        return -y if negate else y

    def describe(self, prefix, suffix="!"):
        return f"{prefix}{float(self.factor)}{suffix}"

    def pid(self):
        return os.getpid()

    def tagged_double(self, x):
        time.sleep(0.002)  # long enough that 8 callers overlap
        return os.getpid(), x * 2

    def fail(self, message):
        raise ValueError(message)

    def numpy_total(self, x):
        return float(numpy.asarray(x, dtype=numpy.float64).sum())

    def call_module(self, module_name, function, *args):
        return getattr(importlib.import_module(module_name), function)(*args)

    def nap(self, seconds):
        time.sleep(seconds)
        return os.getpid()

    def exit_now(self, code):
        os._exit(code)

    def raise_system_exit(self, code):
        raise SystemExit(code)

    def segfault(self):
        import ctypes

        return ctypes.string_at(0)

    def spin(self):
        while True:
            pass

    def hog(self, megabytes):
        """Fill fresh memory (touched, so it is resident), then hold it a moment."""
        block = torch.ones(megabytes * 1024 * 1024, dtype=torch.uint8)
        time.sleep(1.0)
        return block.numel()

    def unsendable(self):
        return object()

    def weight_file(self):
        """The file behind the memory that holds this replica's weights ("" if anonymous)."""
        return _mapped_file(self.factor.data_ptr())

    def input_file(self, x):
        """The file behind the memory that holds an input tensor ("" if anonymous)."""
        return _mapped_file(x.data_ptr())

    def keep(self, x):
        self.kept = x
        return os.getpid()

    def kept_sum(self):
        kept = getattr(self, "kept", None)
        return os.getpid(), None if kept is None else float(kept.sum())

    def factor_here(self):
        return os.getpid(), float(self.factor)

    def multiply_factor_in_place(self, k):
        self.factor.data.mul_(k)
        return os.getpid()


def _mapped_file(address):
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(part, 16) for part in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else ""
    return ""


class DiesInNewWorkers:
    """Loads anywhere until the file named by $DEPLOYD_TEST_POISON_MARKER exists; from then on
    unpickling it (a replay into a new worker) kills the worker, or hangs if the file says "hang"."""

    def __init__(self):
        self.kind = "poison"  # pickle calls __setstate__ only for a non-empty state

    def __setstate__(self, state):
        self.__dict__.update(state)
        marker = os.environ.get("DEPLOYD_TEST_POISON_MARKER", "")
        if marker and os.path.exists(marker):
            with open(marker) as contents:
                if contents.read() == "hang":
                    time.sleep(3600)
            os._exit(7)

    def __call__(self, x):
        return x


class SlowStart:
    """A model whose first call in each process is slow (a lazy init: a cache filled, kernels
    chosen): it sleeps `delay` seconds, then x * scale. Each call appends "pid scale" to the file
    named by $DEPLOYD_TEST_CALL_LOG (when set), so a test sees which workers ran it, how often and
    with what (tests/test_warmup.py)."""

    def __init__(self, delay):
        self.delay = delay
        self.warm = False

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.warm = False  # each replica starts cold, as a fresh process would

    def __call__(self, x, scale=2.0):
        if not self.warm:
            time.sleep(self.delay)
            self.warm = True
        log = os.environ.get("DEPLOYD_TEST_CALL_LOG", "")
        if log:
            with open(log, "a") as calls:
                calls.write(f"{os.getpid()} {float(scale)}\n")
        return x * scale

    def is_warm(self):
        return self.warm


class RaisesLong:
    """Raises a ValueError of x.numel() lines: its traceback too long for any answer to carry
    whole (tests/test_tracebacks.py)."""

    def __call__(self, x):
        return self.explain(int(x.numel()))

    def explain(self, lines):
        raise ValueError("\n".join(f"what went wrong, part {i}" for i in range(lines)))


class EchoMany:
    """Positional arguments back as a tuple (one: itself), keyword arguments as a dict, nothing
    as None: the shapes of result a KServe v2 answer maps to outputs (tests/test_kserve_v2.py)."""

    def __call__(self, *args, **kwargs):
        if kwargs:
            return kwargs
        if not args:
            return None
        return args[0] if len(args) == 1 else args


class Complexify:
    """A complex tensor: a result KServe v2 has no datatype for."""

    def __call__(self, x):
        return torch.complex(x, x)


class BatchProbe:
    """For batching tests: x * scale, and for each row the rows of the batch it ran in (so a
    caller sees how large its batch was). A row of -999 kills the worker; the short sleep per
    call lets concurrent callers pile up behind a busy worker."""

    def __call__(self, x, scale=2.0, as_dict=False):
        if bool((x == -999).any()):
            os._exit(3)
        time.sleep(0.01)
        rows = torch.full((x.shape[0],), x.shape[0], dtype=torch.int64)
        if as_dict:
            return {"y": x * scale, "rows": rows}
        return x * scale, rows


class BadSplit:
    """A result without the batch on dim 0: one row whatever the batch."""

    def __call__(self, x):
        time.sleep(0.01)
        return x.sum(0, keepdim=True)


# ---------------------------------------------------------------------------------------------
# The example models of MultiPy's runtime tests (multipy/runtime/example), rewritten here for
# tests/test_multipy_ports.py: built by tests/package_builder.py (multipy_* packages).


class Simple(torch.nn.Module):
    """MultiPy's "simple" example: a learned (rows, cols) offset added to the input."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(rows, cols))

    def forward(self, input):
        return self.weight + input


class _BasicBlock(torch.nn.Module):
    """ResNet's two-convolution residual block."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.conv2 = torch.nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(planes)
        self.relu = torch.nn.ReLU(inplace=True)
        self.shortcut = torch.nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = torch.nn.Sequential(
                torch.nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), torch.nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(torch.nn.Module):
    """ResNet-18 from torch.nn alone (torchvision's layout: 4 stages of 2 basic blocks)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            torch.nn.BatchNorm2d(64),
            torch.nn.ReLU(inplace=True),
            torch.nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(torch.nn.Sequential(_BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes)))
            in_planes = planes
        self.stages = torch.nn.Sequential(*stages)
        self.pool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.fc = torch.nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics, so eval mode matters
                torch.nn.init.uniform_(module.weight, 0.5, 1.5)
                torch.nn.init.uniform_(module.bias, -0.1, 0.1)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def a_non_torch_leaf(a: int, b):
    """A plain function that FX keeps as one call (torch.fx.wrap below) instead of tracing into."""
    return a * b


torch.fx.wrap("a_non_torch_leaf")


class SimpleWithLeaf(torch.nn.Module):
    """MultiPy's FX example: Simple, with the input going through a wrapped leaf function."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(rows, cols))

    def forward(self, input):
        return self.weight + a_non_torch_leaf(1, input)


class Prints(torch.nn.Module):
    """Prints its input (to the worker's stdout) and returns it doubled."""

    def forward(self, a):
        print(a)
        print("Prints.forward ran", flush=True)
        return a + a


class Printer:
    """Writes to its worker's stdout and stderr, as a chatty model does (tests/test_worker_output.py)."""

    def flood(self, lines, width):
        """`lines` lines of `width` bytes (newline included) to stdout, in one write; returns the bytes."""
        body = "".join(f"flood {index:09d} ".ljust(width - 1, "x") + "\n" for index in range(lines))
        print(body, end="", flush=True)
        return len(body)

    def long_line(self, size):
        print("long:" + "L" * (size - 5))
        return size

    def unfinished(self, text):
        """A line to fd 2 (as C code writes it) with no newline: it is logged when the worker exits."""
        os.write(2, text.encode())
        return text

    def __call__(self, text):
        print(text)
        return text
