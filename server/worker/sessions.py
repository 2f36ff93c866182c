"""A worker's side of sessions (torch::deploy's InterpreterSession and Obj): the Python objects
each open session holds here, by the numbers the daemon gave them, and the steps on them.

A session's objects live only in this worker and only until the session closes; nothing here
leaves the worker except as an object's type name, or as a value when asked (ObjToValue).
Calls run with autograd on, as model code in torch::deploy's interpreters did (an Obj may be
a training step); a ReplicatedObj's calls (server.worker.runtime) run without it.
"""

from __future__ import annotations

import importlib
import io
from typing import Any, Callable, Iterable

import torch
from torch.package import PackageExporter, sys_importer  # type: ignore[attr-defined]

from server.ipc import protocol
from server.worker.devices import to_device
from server.worker.failures import RequestFailed
from server.worker.values import pack, pack_tensor, unpack


def type_name(obj: Any) -> str:
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


class SessionObjects:
    def __init__(
        self,
        replica: Callable[[str], Any],
        importer: Callable[[str], Any],
        importers: Callable[[], Iterable[Any]],
        device_of: Callable[[str], Any] = lambda object_id: None,
    ) -> None:
        self._device_of = device_of  # object id -> its device (server.worker.devices), None: the CPU
        self._devices: dict[str, Any] = {}  # session id -> the device of the model it started from
        self._replica = replica  # object id -> this worker's replica (raises if none)
        self._importer = importer  # package id -> this worker's importer (raises if none)
        self._importers = importers  # every package importer here, the latest first
        self._sessions: dict[str, dict[int, Any]] = {}

    def handlers(self) -> dict[type[Any], Callable[[Any, list[Any], list[Any]], Any]]:
        return {
            protocol.SessionGlobal: self._global,
            protocol.SessionFromValue: self._from_value,
            protocol.SessionFromObject: self._from_object,
            protocol.ObjCall: self._call,
            protocol.ObjAttr: self._attr,
            protocol.ObjToValue: self._to_value,
            protocol.ExportObj: self._export,
        }

    def open_count(self) -> int:
        return len(self._sessions)

    def _keep(self, session_id: str, number: int, obj: Any) -> str:
        self._sessions.setdefault(session_id, {})[number] = obj
        return type_name(obj)

    def _object(self, session_id: str, number: int) -> Any:
        try:
            return self._sessions[session_id][number]
        except KeyError:
            # The daemon checked the number: only a session this worker never saw gets here.
            raise RequestFailed(
                protocol.FAILURE_NOT_FOUND, f"no object {number} in session {session_id!r} in this worker"
            ) from None

    def _global(self, request: protocol.SessionGlobal, _: list[Any], __: list[Any]) -> str:
        module = importlib.import_module(request.module)
        return self._keep(request.session_id, request.result, getattr(module, request.name))

    def _from_value(self, request: protocol.SessionFromValue, buffers: list[Any], _: list[Any]) -> str:
        value = unpack(request.value, buffers, self._sessions.get(request.session_id, {}))
        return self._keep(request.session_id, request.result, _owned(value))

    def _from_object(self, request: protocol.SessionFromObject, _: list[Any], __: list[Any]) -> str:
        obj = self._importer(request.package_id) if request.package_id else self._replica(request.object_id)
        device = None if request.package_id else self._device_of(request.object_id)
        if device is not None:  # a session on a model on a GPU: its calls' tensors go there too
            self._devices[request.session_id] = device
        return self._keep(request.session_id, request.result, obj)

    def _call(self, request: protocol.ObjCall, buffers: list[Any], _: list[Any]) -> str:
        objects = self._sessions.get(request.session_id, {})
        target = self._object(request.session_id, request.target)
        function = getattr(target, request.method) if request.method else target
        args = unpack(request.args, buffers, objects)
        kwargs = unpack(request.kwargs, buffers, objects)
        device = self._devices.get(request.session_id)
        if device is not None:
            args, kwargs = to_device(args, device), to_device(kwargs, device)
        return self._keep(request.session_id, request.result, function(*args, **kwargs))

    def _attr(self, request: protocol.ObjAttr, _: list[Any], __: list[Any]) -> Any:
        target = self._object(request.session_id, request.target)
        if not request.result:
            return hasattr(target, request.name)
        return self._keep(request.session_id, request.result, getattr(target, request.name))

    def _to_value(self, request: protocol.ObjToValue, _: list[Any], out_buffers: list[Any]) -> Any:
        obj = self._object(request.session_id, request.target)
        try:
            return pack(obj, out_buffers)
        except (TypeError, ValueError) as error:
            raise RequestFailed(
                protocol.FAILURE_INVALID_ARGUMENT, f"an object of type {type_name(obj)} has no value form: {error}"
            ) from None

    def _export(self, request: protocol.ExportObj, _: list[Any], out_buffers: list[Any]) -> Any:
        """The object as a torch.package archive of its own: pickled, its tensors as storage
        records (which the daemon stages into shared memory, as any package's weights).

        Its classes come from the worker's own modules (torch, registered sources, extras:
        every worker has them, so they are extern) or from one loaded package, whose modules
        are copied in (interned) and whose externs stay extern. Which: tried in that order,
        the sys modules first, then each package, the latest loaded first."""
        obj = self._object(request.session_id, request.target)
        failures: list[str] = []
        for importer in (None, *self._importers()):
            archive = io.BytesIO()
            importers = sys_importer if importer is None else (importer, sys_importer)
            try:
                with PackageExporter(archive, importer=importers) as exporter:
                    if importer is None:
                        exporter.extern("**")
                    else:
                        if importer.extern_modules:
                            exporter.extern(list(importer.extern_modules))
                        exporter.intern("**")
                    exporter.save_pickle(protocol.MOVABLE_MODULE, protocol.MOVABLE_FILE, obj)
            except Exception as error:  # the exporter's many ways of saying "not from here"
                failures.append(f"{type(error).__name__}: {error}".splitlines()[0])
                continue
            data = torch.frombuffer(bytearray(archive.getbuffer()), dtype=torch.uint8)
            return pack_tensor(data, out_buffers)
        raise RequestFailed(
            protocol.FAILURE_INVALID_ARGUMENT,
            f"cannot create a movable from an object of type {type_name(obj)}: torch.package could not export it"
            f" with this worker's modules nor with any one loaded package ({failures[0]})",
        )

    def close(self, session_id: str) -> int:
        """Drop the session's objects; returns how many there were."""
        self._devices.pop(session_id, None)
        return len(self._sessions.pop(session_id, {}))


def _owned(value: Any) -> Any:
    """A value the session keeps, with its tensors copied out of the request's buffers. A call's
    arguments that model code keeps are noticed after the call and cost the daemon a fresh
    inbox (server.worker.main); a value made to be kept should not."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_owned(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_owned(item) for item in value)
    if isinstance(value, dict):
        return {key: _owned(item) for key, item in value.items()}
    return value
