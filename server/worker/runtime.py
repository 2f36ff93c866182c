"""The model-running side of a worker: its packages, its replicas of objects, the calls on them.

One Runtime lives in each worker process. It knows nothing of sockets or frames: it takes
a request message and its buffers and returns a reply message and the reply's buffers.
"""

from __future__ import annotations

import gc
import linecache
import sys
import traceback
import types
from typing import Any, Callable

import torch
from torch.package import PackageImporter  # type: ignore[attr-defined]

from deployd_worker import Cancelled
from server.ipc import protocol
from server.ipc.protocol import Failure, Reply, Request, Result
from server.worker.devices import move_object, out_of_memory_as_failure, require_device, to_device
from server.worker.failures import RequestFailed
from server.worker.handles import adopt_state
from server.worker.sessions import SessionObjects
from server.worker.shared import SharedWeightsReader
from server.worker.values import pack, unpack
from server.worker.warmup import run_warmup

_MISSING = object()
_RUNS_CODE = (
    protocol.Invoke,
    protocol.SessionGlobal,
    protocol.SessionFromValue,
    protocol.ObjCall,
    protocol.ObjAttr,
    protocol.ObjToValue,
)


class Runtime:
    def __init__(self) -> None:
        self._packages: dict[str, PackageImporter] = {}
        self._objects: dict[str, Any] = {}
        self._devices: dict[str, torch.device] = {}  # object id -> its device, for those not on the CPU
        self._handlers: dict[type[Any], Callable[[Any, list[Any], list[Any]], Any]] = {
            protocol.RegisterModule: self._register_module,
            protocol.OpenPackage: self._open_package,
            protocol.ClosePackage: self._close_package,
            protocol.LoadPickle: self._load_pickle,
            protocol.UnloadObject: self._unload_object,
            protocol.Invoke: self._invoke,
            protocol.HasAttr: self._has_attr,
            protocol.LoadResource: self._load_resource,
        }
        self.sessions = SessionObjects(
            self._object, self._package, lambda: reversed(self._packages.values()), self._devices.get
        )
        self._handlers.update(self.sessions.handlers())
        self._handlers[protocol.SessionClose] = self._close_session

    def handle(self, request: Request, buffers: list[Any]) -> tuple[Reply, list[Any]]:
        """Serve one request; every failure becomes a Failure reply, never an exception."""
        out_buffers: list[Any] = []
        try:
            value = self._handlers[type(request)](request, buffers, out_buffers)
        except RequestFailed as failed:  # its message says it all; a cause's traceback helps (a warmup's)
            return Failure(failed.kind, "", str(failed), traceback.format_exc() if failed.__cause__ else ""), []
        except Cancelled as gone:  # model code stopped early, as asked: not a fault of the model's
            kind = protocol.FAILURE_DEADLINE_EXCEEDED if gone.deadline_passed else protocol.FAILURE_CANCELLED
            return Failure(kind, "", f"the model stopped: {gone}", ""), []
        except Exception as error:  # model code may raise anything
            # Loading is judged as bad input (a broken package or pickle); a failing call, or
            # any step of a session (it runs the caller's Python), is the model's.
            kind = (
                protocol.FAILURE_MODEL_ERROR if isinstance(request, _RUNS_CODE) else protocol.FAILURE_INVALID_ARGUMENT
            )
            return Failure(kind, type(error).__name__, str(error), traceback.format_exc()), []
        return Result(value), out_buffers

    # ------------------------------------------------------------ modules and packages

    def _register_module(self, request: protocol.RegisterModule, _: list[Any], __: list[Any]) -> None:
        filename = f"<deployd module {request.name}>"
        code = compile(request.source, filename, "exec")
        module = types.ModuleType(request.name)
        module.__file__ = filename
        # Let tracebacks through this module show its source lines.
        linecache.cache[filename] = (len(request.source), None, request.source.splitlines(True), filename)
        previous = sys.modules.get(request.name)
        sys.modules[request.name] = module
        try:
            exec(code, module.__dict__)
        except BaseException:
            if previous is None:
                del sys.modules[request.name]
            else:
                sys.modules[request.name] = previous
            raise

    def _open_package(self, request: protocol.OpenPackage, _: list[Any], __: list[Any]) -> None:
        if request.package_id in self._packages:
            return
        importer = PackageImporter(request.path)
        if request.weights_segment:
            importer.zip_reader = SharedWeightsReader(
                importer.zip_reader, request.weights_segment, request.weights_size, request.weights_index
            )
        self._packages[request.package_id] = importer

    def _close_package(self, request: protocol.ClosePackage, _: list[Any], __: list[Any]) -> None:
        importer = self._packages.pop(request.package_id, None)
        if importer is None:
            return
        if isinstance(importer.zip_reader, SharedWeightsReader):
            importer.zip_reader.close()
        _forget_sources(importer)
        del importer
        _collect_garbage()

    def _package(self, package_id: str) -> PackageImporter:
        try:
            return self._packages[package_id]
        except KeyError:
            raise RequestFailed(protocol.FAILURE_NOT_FOUND, f"no package {package_id!r} in this worker") from None

    def _load_resource(self, request: protocol.LoadResource, _: list[Any], __: list[Any]) -> Any:
        package = self._package(request.package_id)
        if request.binary:
            return package.load_binary(request.module, request.resource)
        return package.load_text(request.module, request.resource)

    # ------------------------------------------------------------ objects

    def _load_pickle(self, request: protocol.LoadPickle, _: list[Any], __: list[Any]) -> float | None:
        package = self._package(request.package_id)
        device = require_device(request.device)  # before the unpickling: a host without CUDA fails at once
        if isinstance(package.zip_reader, SharedWeightsReader):
            package.zip_reader.new_mapping()
        loaded = package.load_pickle(request.module, request.file)
        if request.shared:  # the keeper's copy on the device, in place of this one
            with out_of_memory_as_failure("mapping the keeper's weights"):
                adopt_state(loaded, request.shared)
        loaded = move_object(loaded, device)
        # Warm before it is kept: an object whose warmup fails is not loaded here.
        with out_of_memory_as_failure("the warmup"):
            seconds = run_warmup(loaded, request.warmup, device) if request.warmup else None
        self._objects[request.object_id] = loaded
        if device.type != "cpu":
            self._devices[request.object_id] = device
        return seconds

    def _unload_object(self, request: protocol.UnloadObject, _: list[Any], __: list[Any]) -> None:
        self._devices.pop(request.object_id, None)
        if self._objects.pop(request.object_id, None) is not None:
            _collect_garbage()
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()  # its weights' blocks go back to the GPU, for other processes

    def _close_session(self, request: protocol.SessionClose, _: list[Any], __: list[Any]) -> None:
        if self.sessions.close(request.session_id):
            _collect_garbage()  # modules and tensors a session built often sit in cycles

    def _object(self, object_id: str) -> Any:
        try:
            return self._objects[object_id]
        except KeyError:
            raise RequestFailed(protocol.FAILURE_NOT_FOUND, f"no object {object_id!r} in this worker") from None

    def _has_attr(self, request: protocol.HasAttr, _: list[Any], __: list[Any]) -> bool:
        return hasattr(self._object(request.object_id), request.name)

    def _invoke(self, request: protocol.Invoke, buffers: list[Any], out_buffers: list[Any]) -> Any:
        target = self._object(request.object_id)
        method = getattr(target, request.method, _MISSING)
        if method is _MISSING or not callable(method):
            raise RequestFailed(
                protocol.FAILURE_NOT_FOUND,
                f"object {request.object_id!r} ({type(target).__qualname__}) has no method {request.method!r}",
            )
        args = unpack(request.args, buffers)
        kwargs = unpack(request.kwargs, buffers)
        device = self._devices.get(request.object_id)
        if device is None:
            with torch.no_grad():
                result = method(*args, **kwargs)
            return pack(result, out_buffers)
        with out_of_memory_as_failure(f"calling {request.method}"), torch.no_grad():
            result = method(*to_device(args, device), **to_device(kwargs, device))
            return pack(result, out_buffers)  # tensors come back to the CPU (pack_tensor)


def _forget_sources(importer: PackageImporter) -> None:
    """Take a closed package's modules out of linecache.

    The importer registers each module it makes with linecache.lazycache, under the
    module's mangled file name ("<torch_package_N>.pkg/mod.py"), so that tracebacks show
    package source. A lazy entry holds a bound method of the importer, and linecache never
    drops one: left there, it would keep the importer (its archive's file descriptor and
    every module it made) alive for good.
    """
    for module in list(importer.modules.values()):
        filename = getattr(module, "__file__", None)
        if getattr(module, "__loader__", None) is importer and isinstance(filename, str):
            linecache.cache.pop(filename, None)


def _collect_garbage() -> None:
    """Free what an unload let go of, now.

    A package's importer and the modules it made refer to each other (each module's
    `__loader__` is the importer, which keeps its modules), and model objects often sit in
    cycles too, so dropping our reference frees nothing: only a full collection does, and
    a worker that just serves calls makes too few objects to ever run one. Until then the
    importer holds the archive's file descriptor and the last copy-on-write mapping of the
    package's weight segment, which the daemon has already unlinked: every unload leaked
    the package's weights and code. The collection is cheap: torch and everything imported
    before the fork are frozen out of its reach (server.worker.preload), so it walks only
    the objects of the packages still loaded.
    """
    gc.collect()
