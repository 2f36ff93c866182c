"""The daemon's end of the keepers: one process per GPU holding its models' weights on the
device, shared with that GPU's workers (server.worker.keeper, server.worker.handles).

    start() ──> a keeper process per GPU, from the workers' fork server, bound to its GPU
    keep(object id, package path, module, file) ──> {state name: handle} (for LoadPickle.shared)
    drop(object id) ──> the keeper lets the weights go (after the workers unloaded the object)
    stop() ──> Connection closed (the keeper exits on EOF), then terminate, then kill

A keeper asks one question at a time (a lock), each answered on a thread: its Connection blocks.
A keeper that dies fails the question in flight (KeeperFailed) and every later one; the models
it kept stay loaded in the workers, whose mappings hold their memory (a CUDA IPC mapping does
not: see DEVELOPERS.md). Imports no grpc, nor torch.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import multiprocessing
from multiprocessing.context import BaseContext
from typing import Any

from server.errors import DeploydError, error_from_failure
from server.ipc import protocol
from server.pool.worker_handle import exit_code_of, release, start_child
from server.worker.entry import run_keeper

log = logging.getLogger(__name__)


class KeeperFailed(DeploydError):
    """A keeper could not answer: it died, or was never started."""


class Keeper:
    def __init__(self, gpu: int, device: str, extra_sys_paths: tuple[str, ...] = ()) -> None:
        """gpu: the GPU it is bound to (-1: none, CUDA_VISIBLE_DEVICES left as inherited);
        device: where it puts weights, "cuda" or "cpu" (the tests' keeper)."""
        self.gpu = gpu
        self.device = device
        self._extra_sys_paths = extra_sys_paths
        self._process: Any = None
        self._connection: Any = None
        self._lock = asyncio.Lock()
        self._stopping = False
        self.died = asyncio.Event()  # set when its process ends other than by stop()

    @property
    def pid(self) -> int:
        return int(self._process.pid) if self._process is not None else 0

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    async def start(self, context: BaseContext) -> None:
        ours, theirs = multiprocessing.Pipe()
        visible = str(self.gpu) if self.gpu >= 0 else None
        self._process = context.Process(  # type: ignore[attr-defined]
            target=run_keeper,
            args=(theirs, visible, self.device, self._extra_sys_paths),
            name=f"deployd-keeper-{self.gpu}",
            daemon=True,
        )
        try:
            await asyncio.get_running_loop().run_in_executor(None, start_child, self._process)
        finally:
            theirs.close()
        self._connection = ours
        # Its death is seen at once (its sentinel becomes readable), not at the next question.
        loop = asyncio.get_running_loop()
        loop.add_reader(self._process.sentinel, self._on_exit, loop, self._process)
        log.info("keeper of %s started (pid %d)", self.describe(), self.pid)

    def _on_exit(self, loop: asyncio.AbstractEventLoop, process: Any) -> None:
        loop.remove_reader(process.sentinel)
        if self._stopping:
            return
        self.died.set()
        log.error(
            "the keeper of %s (pid %d) died; the weights it held for its workers are gone: load the models on"
            " %s again (or restart the daemon)",
            self.describe(),
            process.pid,
            self.describe(),
        )

    def describe(self) -> str:
        return f"GPU {self.gpu}" if self.gpu >= 0 else self.device

    async def keep(self, object_id: str, path: str, module: str, file: str) -> dict[str, Any]:
        """Load the object on the keeper's device (once) and return its weights' handles."""
        handles = await self._ask(("keep", object_id, path, module, file))
        assert isinstance(handles, dict)
        return handles

    async def drop(self, object_id: str) -> None:
        await self._ask(("drop", object_id))

    async def kept(self) -> list[str]:
        """The object ids it holds weights for."""
        return list(await self._ask(("kept",)))

    async def _ask(self, request: tuple[Any, ...]) -> Any:
        async with self._lock:
            if self._connection is None:
                raise KeeperFailed(f"the keeper of {self.describe()} is not running")
            try:
                reply = await asyncio.to_thread(self._exchange, marshal.dumps(request))
            except (EOFError, OSError) as error:
                self._connection.close()
                self._connection = None
                raise KeeperFailed(
                    f"the keeper of {self.describe()} (pid {self.pid}) died: {type(error).__name__}"
                ) from None
        if reply[0] == "failed":
            _, kind, message = reply
            raise error_from_failure(protocol.Failure(kind, "", message, ""), f"the keeper of {self.describe()}")
        return reply[1]

    def _exchange(self, request: bytes) -> Any:
        self._connection.send_bytes(request)
        return marshal.loads(self._connection.recv_bytes())

    async def stop(self, timeout: float) -> None:
        """Close its Connection (it exits), then terminate it, then kill it."""
        self._stopping = True
        async with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
        process = self._process
        if process is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        for force in (None, process.terminate, process.kill):
            if force is not None:
                force()
            if await loop.run_in_executor(None, exit_code_of, process, timeout) is not None:
                break
        release(process)
        self._process = None
