"""KServe v2's operations, whichever protocol carries them: health, metadata, inference and the
model repository, over the domain (names, versions, declared tensors), raising domain errors.

    gRPC  inference.GRPCInferenceService (server.api.kserve_v2) ─┐
                                                                  ├─> V2Calls ──> ModelCalls
    HTTP  /v2/... REST (server.api.kserve_http) ─────────────────┘    (the daemon's service, or
                                                                        a data port's table)

Both protocols turn their request into InputTensors (server.api.kserve_tensors) and their
answer out of Outputs, so a model meets the same arguments, and a caller the same names,
versions, errors and messages, whichever way it asked. V2Repository adds what only the daemon
serves: the repository extension (index, load, unload), which needs an admin token.

Knows no grpc and no HTTP library.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from server.api.calls import ModelCalls
from server.api.kserve_tensors import (
    InputTensor,
    Output,
    Signature,
    decode_tensors,
    result_outputs,
    select_outputs,
)
from server.api.values import ValueLimits
from server.errors import InvalidArgument, NotFound
from server.models.entry import EntryError, ModelEntry, TensorSpec, parse_entries
from server.models.repository import ModelRepository
from server.models.service import ModelService

PLATFORM = "pytorch_torch_package"
SERVER_NAME = "deployd"
EXTENSIONS = ("model_repository",)
_MAX_REMEMBERED = 1024  # models whose last call's signature is kept for metadata

Declared = Callable[[str], tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]


class TensorMetadata(NamedTuple):
    name: str
    datatype: str
    shape: list[int]  # -1: any size


class ModelMetadata(NamedTuple):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferAnswer(NamedTuple):
    model_name: str
    model_version: str  # the version that ran the call
    outputs: list[Output]
    raw: bool  # the request's tensors came as raw contents (gRPC answers in kind)


class IndexEntry(NamedTuple):
    name: str
    version: str  # the serving version ("" when not loaded)
    state: str  # READY or UNAVAILABLE
    reason: str  # why not loaded ("" when READY)


def server_version() -> str:
    try:
        return importlib.metadata.version("deployd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class V2Calls:
    """Health, metadata and inference of KServe v2: what the daemon serves and every worker's
    data port serves too."""

    def __init__(self, models: ModelCalls, declared: Declared, is_ready: Callable[[], bool], limits: ValueLimits):
        self._models = models
        self._declared = declared
        self.is_ready = is_ready
        self._limits = limits
        # name -> (inputs, outputs) of its last successful call: metadata when none is declared
        self._seen: dict[str, tuple[list[Signature], list[Signature]]] = {}

    def model_ready(self, name: str, version_text: str) -> bool:
        """The model (or the version asked) is loaded and a worker can serve it. An unknown model
        is not ready (not an error: a readiness probe asks before it loads)."""
        version = parse_version(version_text)
        try:
            model = self._models.named_model(name)
        except NotFound:
            return False
        object_id = model.versions.get(version or model.serving)
        # A placed model is ready while a worker that holds it serves.
        return object_id is not None and self.is_ready() and self._models.has_workers(object_id)

    def model_metadata(self, name: str, version_text: str) -> ModelMetadata:
        name = required_name(name)
        version = parse_version(version_text)
        model = self._models.named_model(name)
        if version and version not in model.versions:
            loaded = ", ".join(map(str, model.versions))
            raise NotFound(f"model {name!r} has no version {version} (loaded: {loaded})")
        declared_inputs, declared_outputs = self._declared(name)
        inputs_seen, outputs_seen = self._seen.get(name, ([], []))
        return ModelMetadata(
            name,
            [str(number) for number in model.versions],
            PLATFORM,
            _tensor_metadata(declared_inputs, inputs_seen),
            _tensor_metadata(declared_outputs, outputs_seen),
        )

    def resolve(self, name: str, version_text: str) -> tuple[str, int]:
        """The model and version a call names: (name, the version asked, else the serving one)."""
        name = required_name(name)
        # The name first: a name that is not loaded is NOT_FOUND whatever the version says, so
        # the calls metrics never take a made-up name as a label (server.api.calls).
        serving = self._models.named_model(name).serving
        return name, parse_version(version_text) or serving

    async def infer(
        self, name: str, version: int, inputs: Sequence[InputTensor], requested: Sequence[str]
    ) -> InferAnswer:
        """Run the model (resolve()'s name and version) on the inputs; the outputs named in
        requested (none: all of them)."""
        declared_inputs, declared_outputs = self._declared(name)
        decoded = decode_tensors(inputs, declared_inputs, self._limits)
        # Pinned to the version resolved above, so the answer names the version that ran it.
        result, buffers = await self._models.invoke(
            name, version, "__call__", decoded.args, decoded.kwargs, decoded.buffers
        )
        outputs = select_outputs(result_outputs(result, buffers, declared_outputs), requested)
        self._remember(name, decoded.seen, [Signature(out.name, out.datatype, len(out.shape)) for out in outputs])
        return InferAnswer(name, str(version), outputs, decoded.raw)

    def _remember(self, name: str, inputs: list[Signature], outputs: list[Signature]) -> None:
        if name not in self._seen and len(self._seen) >= _MAX_REMEMBERED:
            served = self._models.served_names()
            for gone in [known for known in self._seen if known not in served]:
                del self._seen[gone]
            if len(self._seen) >= _MAX_REMEMBERED:
                return
        self._seen[name] = (inputs, outputs)


class V2Repository:
    """The model repository extension: the daemon's models by name (admin only)."""

    def __init__(self, service: ModelService, repository: ModelRepository) -> None:
        self._service = service
        self._repository = repository

    def declared(self, name: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """The inputs and outputs a model's entry declares (none: ((), ()))."""
        entry = self._repository.entry(name)
        return (entry.inputs, entry.outputs) if entry else ((), ())

    def index(self, ready_only: bool) -> list[IndexEntry]:
        """Every model of the repository (the config's and those loaded by name since), with
        its state: READY (and its serving version) or UNAVAILABLE (and why)."""
        served = self._service.served_names()
        listed = set()
        index = []
        for entry in self._repository.entries:
            listed.add(entry.name)
            if entry.name in served:
                index.append(IndexEntry(entry.name, str(self._service.named_model(entry.name).serving), "READY", ""))
            elif not ready_only:
                why = self._repository.errors.get(entry.name, "not loaded")
                index.append(IndexEntry(entry.name, "", "UNAVAILABLE", why))
        for name in sorted(served - listed):  # named at run time through deployd.v1
            index.append(IndexEntry(name, str(self._service.named_model(name).serving), "READY", ""))
        return index

    async def load(self, name: str, config: str | None) -> None:
        """Load a model by name: its config entry, or the entry in config (JSON: package,
        pickle, and optionally inputs, outputs), as tritonclient's load_model(name, config=...)
        sends it."""
        name = required_name(name)
        await self._repository.load_by_name(name, entry_from_config(name, config))

    async def unload(self, name: str) -> None:
        await self._repository.unload_by_name(required_name(name))


def required_name(name: str) -> str:
    if not name:
        raise InvalidArgument("the model name is empty")
    return name


def parse_version(text: str) -> int:
    """A v2 version string: empty (the serving version, 0) or a positive number."""
    if not text:
        return 0
    # Versions count up from 1: more than 18 digits is no version (and int() of thousands of
    # digits is refused by Python itself).
    if not (text.isascii() and text.isdigit()) or len(text) > 18 or int(text) == 0:
        raise InvalidArgument(f"model version {text[:64]!r} is not a positive number (empty: the serving version)")
    return int(text)


def _tensor_metadata(declared: tuple[TensorSpec, ...], seen: list[Signature]) -> list[TensorMetadata]:
    if declared:
        return [TensorMetadata(spec.name, spec.datatype, list(spec.shape)) for spec in declared]
    # Only what the last call showed: its names and datatypes; any size (-1) in each dimension.
    return [TensorMetadata(item.name, item.datatype, [-1] * item.rank) for item in seen]


def entry_from_config(name: str, text: str | None) -> ModelEntry | None:
    """The repository entry a load's `config` parameter gives (None: the config's own)."""
    if text is None:
        return None
    try:
        raw: Any = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InvalidArgument(f"the config parameter is not JSON: {error or 'nested too deep'}") from None
    if not isinstance(raw, dict):
        raise InvalidArgument('the config parameter must be a JSON object: {"package": ..., "pickle": "module:file"}')
    try:
        (entry,) = parse_entries([{**raw, "name": name}])
    except EntryError as error:
        raise InvalidArgument(f"the config parameter: {error}") from None
    return entry
