"""A model repository entry (`models:` in the config): the model's name, where it comes from,
and, optionally, the tensors it takes and gives (for KServe v2's metadata and input names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from deployd_wire.dtypes import DTYPES
from server.batching.batcher import BatchPolicy
from server.errors import InvalidArgument
from server.models.devices import CPU, parse_device
from server.models.names import check_name
from server.models.placement import EVERYWHERE, Placement, parse_placement
from server.models.warmup import Warmup, WarmupError, parse_warmup


class TensorSpec(NamedTuple):
    """A declared input or output: its name, KServe v2 datatype ("FP32", "BYTES", ...) and
    shape, -1 for a size that may be anything."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelEntry:
    """One model of the repository (`models:` in the config): served by name from a package."""

    name: str
    package: str  # a path inside packages.directory
    module: str
    file: str
    # Declared: KServe v2 inputs are matched to keyword arguments by name; outputs name the results.
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    batching: BatchPolicy | None = None  # dynamic batching (server.batching); None: off
    workers: Placement = EVERYWHERE  # where it is loaded and called (server.models.placement)
    warmup: Warmup | None = None  # calls run on each worker after the load (server.models.warmup)
    device: str = CPU  # cpu, cuda, cuda:N or auto (server.models.devices)


class EntryError(ValueError):
    """An entry that does not describe a model: the message says which and why."""


def parse_entries(raw: Any) -> tuple[ModelEntry, ...]:
    """The `models:` list: each entry a mapping of name, package and pickle ("module:file"),
    and optionally inputs and outputs (each a list of name, datatype, shape), batching and warmup."""
    if not isinstance(raw, list):
        raise EntryError(f"models must be a list of entries (name, package, pickle), got {raw!r}")
    entries: list[ModelEntry] = []
    for position, item in enumerate(raw, 1):
        where = f"models entry {position}"
        if not isinstance(item, dict) or not {"name", "package", "pickle"} <= set(item) <= _ENTRY_KEYS:
            raise EntryError(
                f"{where} must have the keys name, package and pickle (and may have inputs, outputs, batching,"
                f" workers, warmup, device),"
                f" got {item!r}"
            )
        name, package, pickle = (item[key] for key in ("name", "package", "pickle"))
        if not all(isinstance(value, str) and value for value in (name, package, pickle)):
            raise EntryError(f"{where}: name, package and pickle must be non-empty strings")
        try:
            check_name(name)
        except InvalidArgument as error:
            raise EntryError(f"{where}: {error}") from None
        module, colon, file = pickle.partition(":")
        if not (module and colon and file):
            raise EntryError(f"{where} ({name}): pickle must be module:file, got {pickle!r}")
        if any(entry.name == name for entry in entries):
            raise EntryError(f"{where}: the name {name!r} is listed twice")
        inputs = _tensor_specs(item.get("inputs", []), f"{where} ({name}) inputs")
        outputs = _tensor_specs(item.get("outputs", []), f"{where} ({name}) outputs")
        batching = _batch_policy(item["batching"], f"{where} ({name}) batching") if "batching" in item else None
        workers = _placement(item["workers"], f"{where} ({name}) workers") if "workers" in item else EVERYWHERE
        try:
            warmup = parse_warmup(item["warmup"], f"{where} ({name}) warmup") if "warmup" in item else None
        except WarmupError as error:
            raise EntryError(str(error)) from None
        try:
            device = parse_device(item.get("device", CPU))
        except InvalidArgument as error:
            raise EntryError(f"{where} ({name}): {error}") from None
        entries.append(ModelEntry(name, package, module, file, inputs, outputs, batching, workers, warmup, device))
    return tuple(entries)


_ENTRY_KEYS = {"name", "package", "pickle", "inputs", "outputs", "batching", "workers", "warmup", "device"}
_BATCHING_KEYS = {"max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes"}


def _placement(raw: Any, where: str) -> Placement:
    try:
        return parse_placement(raw)
    except InvalidArgument as error:
        raise EntryError(f"{where}: {error}") from None


def _batch_policy(raw: Any, where: str) -> BatchPolicy:
    if not isinstance(raw, dict) or "max_batch_size" not in raw or not set(raw) <= _BATCHING_KEYS:
        raise EntryError(
            f"{where} must be a mapping with max_batch_size (and may have max_queue_delay_ms,"
            f" preferred_batch_sizes), got {raw!r}"
        )
    size, delay = raw["max_batch_size"], raw.get("max_queue_delay_ms", 2.0)
    preferred = raw.get("preferred_batch_sizes", [])
    if type(size) is not int or type(delay) not in (int, float) or not isinstance(preferred, list):
        raise EntryError(f"{where}: max_batch_size an integer, max_queue_delay_ms a number, preferred a list")
    if not all(type(item) is int for item in preferred):
        raise EntryError(f"{where}: preferred_batch_sizes must be integers, got {preferred!r}")
    try:
        return BatchPolicy(size, float(delay), tuple(preferred)).checked()
    except InvalidArgument as error:
        raise EntryError(f"{where}: {error}") from None


# KServe v2 datatypes a declaration may name (deployd_wire's table, and BYTES).
_DATATYPES = (*(dtype.kserve for dtype in DTYPES if dtype.kserve), "BYTES")


def _tensor_specs(raw: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list):
        raise EntryError(f"{where} must be a list of tensors (name, datatype, shape), got {raw!r}")
    specs: list[TensorSpec] = []
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"name", "datatype", "shape"}:
            raise EntryError(f"{where}: each must have exactly the keys name, datatype and shape, got {item!r}")
        name, datatype, shape = item["name"], item["datatype"], item["shape"]
        if not (isinstance(name, str) and name.isidentifier()):
            raise EntryError(f"{where}: name must be a Python identifier (it becomes a keyword argument), got {name!r}")
        if datatype not in _DATATYPES:
            raise EntryError(f"{where} {name}: datatype must be one of {', '.join(_DATATYPES)}, got {datatype!r}")
        if not (isinstance(shape, list) and all(type(size) is int and size >= -1 for size in shape)):
            raise EntryError(f"{where} {name}: shape must be a list of sizes (-1: any), got {shape!r}")
        if any(spec.name == name for spec in specs):
            raise EntryError(f"{where}: {name!r} is listed twice")
        specs.append(TensorSpec(name, datatype, tuple(shape)))
    return tuple(specs)
