"""How the daemon names a worker's entry point, without importing torch itself.

The daemon needs the target function and its settings to start a worker process; the
worker's real main imports torch (hundreds of MB the daemon has no use for). This
trampoline imports it in the worker, where the fork server has already loaded it.
"""

from __future__ import annotations

import signal
import socket
from typing import Any, NamedTuple

# The signal on which a worker writes every thread's Python stack to the daemon's stderr
# (inherited through the fork server; not its output pipe: server.worker.output): the daemon sends it to a worker it is
# about to kill for a hung call, so that the log shows where the call hung.
DUMP_STACKS_SIGNAL = signal.SIGUSR1


class WorkerSettings(NamedTuple):
    num_threads: int
    extra_sys_paths: tuple[str, ...]
    shm_threshold_bytes: int  # tensors this large or larger go through shared memory
    # setrlimit (soft and hard) before any model code runs; 0: as inherited.
    max_open_files: int = 0
    max_address_space_bytes: int = 0
    # Become this user and group at start (the daemon runs as root); -1: stay as the daemon's user.
    uid: int = -1
    gid: int = -1
    # The cancel board's segment (server.ipc.cancel_board; "": none) and the worker's slot in it,
    # where the daemon flags a call whose caller gave up (deployd_worker.cancelled()).
    cancel_board: str = ""
    slot: int = -1
    # The write end of this worker's output pipe (a multiprocessing Connection), made for each
    # worker by WorkerHandle.spawn: its fds 1 and 2 at boot. None: they stay as inherited.
    output: Any = None
    # Each slot's GPU (-1: none), from pool.gpus: a worker sees only its slot's GPU
    # (CUDA_VISIBLE_DEVICES, set at boot before anything starts CUDA). (): the environment as inherited.
    slot_gpus: tuple[int, ...] = ()

    @property
    def cuda_visible_devices(self) -> str | None:
        """This worker's CUDA_VISIBLE_DEVICES: its GPU, "" (none: a CPU worker of a GPU pool),
        or None (no GPUs configured: left as inherited)."""
        if not self.slot_gpus or not 0 <= self.slot < len(self.slot_gpus):
            return None
        gpu = self.slot_gpus[self.slot]
        return str(gpu) if gpu >= 0 else ""


def run_worker(channel: socket.socket, settings: WorkerSettings) -> None:
    from server.worker.main import worker_main

    worker_main(channel, settings)


def run_keeper(connection: Any, visible: str | None, device: str, extra_sys_paths: tuple[str, ...]) -> None:
    """A keeper process (server.worker.keeper): the weights of its GPU's models."""
    from server.worker.keeper import keeper_main

    keeper_main(connection, visible, device, extra_sys_paths)
