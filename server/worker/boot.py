"""What every worker does first, before any model code runs: its output, user, limits and
threads; and, if any of it fails, telling the daemon why before it exits.

    boot(channel, settings) ──> each step (redirecting output, switching user, each rlimit, ...)
        all done ──> the Runtime (the caller greets the daemon: Ready)
        a step raised ──> BootFailed(pid, "<step>: <ExceptionType>: <message>") on the channel
                      ──> exit WorkerExitCode.BOOT_FAILED

The daemon puts the reason in its log line about the failed start, and in the slot's
last_failure (Status) while it retries.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import pwd
import resource
import signal
import socket
import sys
import warnings
from collections.abc import Iterator
from typing import Any, NoReturn

import torch

from server.ipc.protocol import BootFailed, encode_frame, write_frame_blocking
from server.worker.entry import DUMP_STACKS_SIGNAL, WorkerSettings
from server.worker.exit_codes import WorkerExitCode
from server.worker.output import daemon_stderr, redirect_output
from server.worker.runtime import Runtime


class BootError(Exception):
    """A step of a worker's start failed; the message names the step and its error."""


@contextlib.contextmanager
def step(doing: str) -> Iterator[None]:
    """Turn any error in the block into a BootError that says what was being done."""
    try:
        yield
    except Exception as error:
        raise BootError(f"{doing}: {type(error).__name__}: {error}") from error


def boot(channel: socket.socket, settings: WorkerSettings) -> Runtime:
    """start_worker_process, or, if it fails, the reason to the daemon and exit."""
    try:
        return start_worker_process(settings)
    except BootError as error:
        report_boot_failure(channel, str(error))


def report_boot_failure(channel: socket.socket, reason: str) -> NoReturn:
    with contextlib.suppress(OSError):  # the daemon has gone: no one to tell
        write_frame_blocking(channel, encode_frame(0, BootFailed(os.getpid(), reason), []))
    raise SystemExit(WorkerExitCode.BOOT_FAILED)


def start_worker_process(settings: WorkerSettings) -> Runtime:
    """Every step of a worker's start, in order; BootError names the one that failed."""
    with step("redirecting its output to the daemon"):
        redirect_output(settings.output)
    bind_gpu(settings.cuda_visible_devices)
    if settings.uid >= 0:
        with step(f"switching to {_describe_user(settings.uid, settings.gid)}"):
            _become_user(settings.uid, settings.gid)  # first: a change of user clears the parent-death signal
    with step("asking to be killed with its parent"):
        die_with_parent()
    _limit_resources(settings)
    # Ctrl-C reaches the whole process group; the daemon decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Before killing a hung worker the daemon asks for its stacks: written from C, with no
    # Python code run, so they come even while a model holds the interpreter. To the daemon's
    # stderr rather than the output pipe, so that they arrive even while the daemon drops output.
    with step("registering the stack dump"):
        faulthandler.register(DUMP_STACKS_SIGNAL, file=daemon_stderr(), all_threads=True, chain=False)
    # torch.package's unpickler still uses TypedStorage; the warning says nothing to an operator.
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    # A tensor read from a socket or a gRPC request wraps bytes owned by that one request
    # alone (dropped once it is answered), so model code writing to it harms no one.
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    with step(f"setting torch's threads to {settings.num_threads}"):
        torch.set_num_threads(settings.num_threads)
    sys.path.extend(settings.extra_sys_paths)
    with step("starting its runtime"):
        return Runtime()


def bind_gpu(visible: str | None) -> None:
    """Show this worker its GPU alone (None: leave the environment as it is). Read by CUDA when
    it starts, which nothing has done yet: not the fork server, nor the daemon (server.models.devices).
    NVML's order (the daemon's metrics, pool.gpus) is the PCI bus order; CUDA's must be the same."""
    if visible is None:
        return
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = visible


def _describe_user(uid: int, gid: int) -> str:
    try:
        name = f"user {pwd.getpwuid(uid).pw_name!r}"
    except (KeyError, OverflowError):
        name = "a user not in the password database"
    return f"{name} (uid {uid}, gid {gid})"


def _become_user(uid: int, gid: int) -> None:
    """Drop root for worker.user before any model code runs; workers never get it back."""
    if uid < 0 or os.getuid() == uid:
        return
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _limit_resources(settings: WorkerSettings) -> None:
    """worker.max_open_files and worker.max_address_space_bytes, as soft and hard limits:
    model code cannot raise them again. Past them, opening a file fails with EMFILE and an
    allocation with MemoryError (torch: RuntimeError "can't allocate memory"), in that call."""
    for name, which, value in (
        ("RLIMIT_NOFILE", resource.RLIMIT_NOFILE, settings.max_open_files),
        ("RLIMIT_AS", resource.RLIMIT_AS, settings.max_address_space_bytes),
    ):
        if not value:
            continue
        with step(f"setting {name} to {value}"):
            hard = resource.getrlimit(which)[1]
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)  # only root may raise a hard limit
            if which == resource.RLIMIT_AS and value <= (mapped := _mapped_bytes()):
                # The kernel would take it, and the worker would fail at some later allocation
                # of its own, with a MemoryError that says nothing of the limit.
                raise ValueError(f"below the {mapped} bytes this worker maps already")
            resource.setrlimit(which, (value, value))


def _mapped_bytes() -> int:
    """This process's address space (what RLIMIT_AS limits), from /proc/self/statm."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def die_with_parent() -> None:
    """Have the kernel SIGKILL this worker when its parent dies (Linux).

    The parent is the fork server, which exits when the daemon does, however the daemon
    ends (even SIGKILL). An idle worker would notice anyway (its channel reaches EOF),
    but one busy in a long call would not until the call ends.
    """
    # multiprocessing hands every forked child the write end of the fork server's "alive"
    # pipe, so that children may fork through it too; the fork server then lives while any
    # worker does, and a busy worker would wait for it forever. Workers never fork.
    from multiprocessing import forkserver

    server: Any = forkserver._forkserver  # type: ignore[attr-defined]
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not Linux: the channel's EOF is the only signal
    if os.getppid() != parent:  # the parent died before the request took effect: no one to tell
        os._exit(WorkerExitCode.BOOT_FAILED)


_PR_SET_PDEATHSIG = 1
