"""A keeper: one process per GPU that holds each model's weights on the device and shares them
with that GPU's workers (server.worker.handles), so N workers hold one copy, and a worker that
dies takes none of it with it.

    daemon (server.pool.keepers) ──Keep(object id, package, pickle)──> keeper: unpickle, move to
        its device, share ──> {state name: handle} ──> daemon ──LoadPickle(shared=...)──> workers
    daemon ──Drop(object id)──> keeper lets the weights go (after every worker unloaded it)

Messages are marshal'd builtins on a multiprocessing Connection (send_bytes / recv_bytes): a
request (kind, fields...), a reply ("ok", value) or ("failed", failure kind, message). The
keeper is device-agnostic: on "cpu" it shares through shared memory, which is how the tests
exercise it on a host without a GPU. It starts from the fork server, bound to its GPU as a
worker is (CUDA_VISIBLE_DEVICES) before anything starts CUDA, and exits when its Connection
reaches EOF (the daemon closed it or died) or its parent dies.
"""

from __future__ import annotations

import gc
import marshal
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch.package import PackageImporter  # type: ignore[attr-defined]

from server.ipc import protocol
from server.worker.boot import bind_gpu, die_with_parent
from server.worker.devices import move_object, require_device
from server.worker.failures import RequestFailed
from server.worker.handles import share_state


def keeper_main(connection: Connection, visible: str | None, device: str, extra_sys_paths: tuple[str, ...]) -> None:
    bind_gpu(visible)
    sys.path.extend(extra_sys_paths)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.multiprocessing.set_sharing_strategy("file_system")  # CPU handles name their segments
    kept: dict[str, Any] = {}
    while True:
        try:
            request = marshal.loads(connection.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            reply: tuple[Any, ...] = ("ok", _handle(request, kept, device))
        except RequestFailed as failed:
            reply = ("failed", failed.kind, str(failed))
        except Exception as error:  # model code may raise anything while unpickled or moved
            reply = ("failed", protocol.FAILURE_INVALID_ARGUMENT, f"{type(error).__name__}: {error}")
        try:
            connection.send_bytes(marshal.dumps(reply))
        except (BrokenPipeError, OSError):
            return


def _handle(request: tuple[Any, ...], kept: dict[str, Any], device: str) -> Any:
    kind, *fields = request
    if kind == "keep":
        object_id, path, module, file = fields
        target = require_device(device)
        if object_id not in kept:
            importer = PackageImporter(path)
            model = move_object(importer.load_pickle(module, file), target)
            kept[object_id] = model
        return share_state(kept[object_id])
    if kind == "drop":
        if kept.pop(fields[0], None) is not None:
            gc.collect()
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        return None
    if kind == "kept":
        return sorted(kept)
    raise RequestFailed(protocol.FAILURE_INVALID_ARGUMENT, f"a keeper has no request {kind!r}")
