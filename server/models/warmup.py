"""A model's warmup (`warmup:` in its config entry): calls run on each worker right after the
model is loaded there, before it serves, so that its first real call finds it warm.

    config ──> parse_warmup (checked: the inputs' form, the file's name) ──> Warmup in the ModelEntry
    load   ──> warmup_message (the inputs file read from packages.directory)
           ──> LoadPickle.warmup ──> every worker: unpickle, then run the calls (server.worker.warmup)
    a new worker ──> the same LoadPickle, replayed from the registry: warm before it takes calls

The warmup travels inside the load, so a model is loaded (named, routed, SERVING in health,
ready in KServe v2) only once its warmup has run on every worker it is on, and a warmup that
raises is that load's failure (a start exits 2; a reload reports it; a replay evicts it).

Inputs are ARGs of `deployd invoke`'s language (deployd_wire.tensor_args), checked here without
building them, or a torch.save file (read by the daemon, which keeps its bytes to replay them).
Imports no grpc and no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployd_wire.tensor_args import BadArg, check_arg
from server.models.packages import resolve_server_path

_KEYS = {"inputs", "kwargs", "file", "method", "repeat"}


class WarmupError(ValueError):
    """A `warmup:` that does not describe one: the message says why."""


@dataclass(frozen=True)
class Warmup:
    """What to call, with what, how many times."""

    inputs: tuple[str, ...] = ()  # positional arguments, each an ARG
    kwargs: tuple[tuple[str, str], ...] = ()  # (name, ARG)
    file: str = ""  # a torch.save of the arguments, inside packages.directory; "": none
    method: str = "__call__"
    repeat: int = 1


def parse_warmup(raw: Any, where: str) -> Warmup:
    """`warmup: {inputs: [ARG, ...], kwargs: {name: ARG}, file: name.pt, method: m, repeat: n}`:
    inputs and kwargs, or a file; where prefixes every error (it names the model)."""
    if not isinstance(raw, dict) or not set(raw) <= _KEYS or not set(raw) & {"inputs", "kwargs", "file"}:
        raise WarmupError(
            f"{where} must be a mapping with inputs (a list of ARGs), kwargs (ARGs by name) or file (a torch.save"
            f" in packages.directory), and may have method and repeat, got {raw!r}"
        )
    inputs, kwargs, file = raw.get("inputs", []), raw.get("kwargs", {}), raw.get("file", "")
    method, repeat = raw.get("method", "__call__"), raw.get("repeat", 1)
    if file and (inputs or kwargs):
        raise WarmupError(f"{where}: give inputs and kwargs, or a file, not both")
    if not (isinstance(inputs, list) and all(isinstance(text, str) for text in inputs)):
        raise WarmupError(f"{where} inputs must be a list of ARGs (strings, as `deployd invoke` takes), got {inputs!r}")
    if not (isinstance(kwargs, dict) and all(isinstance(v, str) and str(k).isidentifier() for k, v in kwargs.items())):
        raise WarmupError(f"{where} kwargs must map argument names to ARGs (strings), got {kwargs!r}")
    if not isinstance(file, str) or "\x00" in file:
        raise WarmupError(f"{where} file must be a path inside packages.directory, got {file!r}")
    if not (isinstance(method, str) and method.isidentifier()):
        raise WarmupError(f"{where} method must be a method's name, got {method!r}")
    if type(repeat) is not int or repeat < 1:
        raise WarmupError(f"{where} repeat must be an integer of at least 1, got {repeat!r}")
    for text in [*inputs, *kwargs.values()]:
        try:
            check_arg(text)
        except BadArg as error:
            raise WarmupError(f"{where}: {error}") from None
    return Warmup(tuple(inputs), tuple(kwargs.items()), file, method, repeat)


def warmup_message(warmup: Warmup | None, package_directory: Path) -> tuple[Any, ...]:
    """The warmup as LoadPickle carries it (server.ipc.protocol), () for none: the inputs file is
    read now (NotFound, or PathNotAllowed outside packages.directory), so later changes to it
    change nothing loaded, and a replacement worker gets the same bytes."""
    if warmup is None:
        return ()
    data = resolve_server_path(package_directory, warmup.file).read_bytes() if warmup.file else b""
    return (warmup.method, list(warmup.inputs), dict(warmup.kwargs), data, warmup.repeat)
