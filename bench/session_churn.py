"""Session churn: open a session, make objects in it, close it; CYCLES times against one daemon
(2 workers). Sessions leave nothing behind: memory, fds and /dev/shm stay flat.

Each cycle opens a session (acquire_one), makes a torch.nn.Linear(256, 256) in it (global_),
calls it on a from_value tensor of 128 KiB (over worker.shm_threshold_bytes, so the tensor
goes to the worker through shared memory, and so does the result) and brings the result back
(to_value). Every 10th cycle it also replicates the layer to every worker (create_movable:
an export, a package of its own staged into shared memory, an unpickle on every worker),
calls the ReplicatedObj once (it must answer as the session's layer did) and unloads it.
Then the session is closed; every 50th cycle it is opened through a manager of its own that
is closed without closing the session, so the daemon must end it when its stream goes.

After every 10th cycle the bench reads /proc for the daemon and each worker (RSS; resident
anonymous memory; private memory, from smaps_rollup; fds; unlinked deployd segments still
mapped), counts the daemon's deployd-<pid>-* segments in /dev/shm, and asks Status for the
open sessions (0 between cycles: it waits up to 10 s for the daemon to notice a stream that
went). Every 100 cycles it prints a row. At the end, the trend of each figure: the median of
the last 20 readings against the median of the first 20 (200 cycles each; a third of the
readings each in a short run), and the growth per cycle between them, judged as PASS or FAIL:
daemon RSS, workers' RSS and anonymous memory <= 1.10; fds, segments and unlinked segments
mapped equal; no open session at any reading; no worker replaced. The workers' private memory
is shown, not judged: it grows by copy on write of pages inherited from the fork server while
their RSS stays put. Exits 1 if any check fails.

    python -m bench.session_churn [CYCLES] [SECONDS]      (default 2000 cycles, 900 s)

It stops early, and says so, when SECONDS have passed (the trend is judged on the readings
taken by then).

In the suite (`python -m bench`, run()): 1000 cycles (at most 300 s), judged as above; with
--smoke, 50 cycles (each kind of cycle met: a movable, an abandoned session), where only the
open sessions and the workers are judged: a handful of readings makes no trend.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from bench.common import Context
from client import InterpreterManager
from server.pool.procinfo import anonymous_resident_bytes, memory_usage
from tests.daemon_process import DaemonProcess, shm_segments, wait_until

WORKERS = 2
WIDTH = 256  # the layer's nn.Linear(256, 256): 256 KiB of weights
ROWS = 128  # the input: 128 x 256 float32 = 128 KiB, over the shared-memory threshold (64 KiB)
MOVABLE_EVERY = 10
ABANDON_EVERY = 50
READ_EVERY = 10
PRINT_EVERY = 100
WINDOW = 20  # readings at each end whose medians the trend compares
MIB = 2**20


def one_cycle(manager: InterpreterManager, cycle: int, x: torch.Tensor) -> None:
    """One session's life: objects made, called, brought back; a movable every MOVABLE_EVERY
    cycles; closed, or (every ABANDON_EVERY cycles) left to the daemon when its client goes."""
    abandoned = cycle % ABANDON_EVERY == ABANDON_EVERY - 1
    owner = InterpreterManager(manager.target, timeout=60) if abandoned else manager
    session = owner.acquire_one()
    try:
        layer = session.global_("torch.nn", "Linear")(WIDTH, WIDTH)
        out = layer(session.from_value(x)).to_value()
        if out.shape != (ROWS, WIDTH):
            raise AssertionError(f"cycle {cycle}: the layer answered a tensor of shape {tuple(out.shape)}")
        if cycle % MOVABLE_EVERY == 0:
            replicated = owner.create_movable(layer, session)
            try:
                again = replicated(x)
            finally:
                replicated.unload()
            if not torch.allclose(again, out, atol=1e-5):
                raise AssertionError(f"cycle {cycle}: the movable answered otherwise than the session's layer")
    finally:
        if abandoned:
            owner.close()  # the session is not closed: its stream ends with the channel
        else:
            session.close()


@dataclass
class Reading:
    cycle: int
    seconds: float
    daemon_rss: int
    daemon_fds: int
    worker_pids: list[int]
    worker_rss: list[int]
    worker_anon: list[int]  # resident anonymous memory (heap, tensors): statm resident - shared
    worker_private: list[int]  # resident pages only that worker maps (smaps_rollup)
    worker_fds: list[int]
    segments: int  # the daemon's deployd-<pid>-* segments in /dev/shm
    deleted_maps: int  # mappings of unlinked deployd segments in the workers: weights nobody can name
    open_sessions: int
    waited: float  # how long Status took to show no open session


def rss_bytes(pid: int) -> int:
    return memory_usage(pid).rss_bytes


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def daemon_segments(daemon_pid: int) -> int:
    return sum(1 for name in shm_segments() if name.startswith(f"deployd-{daemon_pid}-"))


def deleted_segments_mapped(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as maps:
        return sum(1 for line in maps if "/deployd-" in line and line.rstrip().endswith("(deleted)"))


def read(manager: InterpreterManager, daemon_pid: int, cycle: int, started: float) -> Reading:
    asked = time.monotonic()
    wait_until(lambda: not manager.status().sessions, 10, interval=0.02)
    status = manager.status()
    waited = time.monotonic() - asked
    pids = [worker.pid for worker in status.workers]
    return Reading(
        cycle=cycle,
        seconds=time.monotonic() - started,
        daemon_rss=rss_bytes(daemon_pid),
        daemon_fds=open_fds(daemon_pid),
        worker_pids=pids,
        worker_rss=[rss_bytes(pid) for pid in pids],
        worker_anon=[anonymous_resident_bytes(pid) for pid in pids],
        worker_private=[memory_usage(pid).private_bytes for pid in pids],
        worker_fds=[open_fds(pid) for pid in pids],
        segments=daemon_segments(daemon_pid),
        deleted_maps=sum(deleted_segments_mapped(pid) for pid in pids),
        open_sessions=len(status.sessions),
        waited=waited,
    )


def row(reading: Reading) -> str:
    def mib(values: list[int]) -> str:
        return "+".join(f"{value / MIB:.1f}" for value in values)

    return (
        f"{reading.cycle + 1:>6} {reading.seconds:>6.0f} {reading.daemon_rss / MIB:>8.1f} {reading.daemon_fds:>4}"
        f"  {mib(reading.worker_rss):>13} {mib(reading.worker_anon):>13} {mib(reading.worker_private):>13}"
        f"  {'+'.join(map(str, reading.worker_fds)):>7} {reading.segments:>4} {reading.deleted_maps:>4}"
        f" {reading.open_sessions:>5} {reading.waited:>5.2f}"
    )


HEADER = " cycle      s daemonMiB  fds   workerRSSMiB  workerAnonMiB  workerPrivMiB  wkrFds  shm  del  open  wait"


# How each figure's trend is judged: a ratio bound, "equal", or not at all ("info").
FIGURES: list[tuple[str, Callable[[Reading], int], str]] = [
    ("daemon RSS", lambda r: r.daemon_rss, "<= 1.10"),
    ("workers' RSS (sum)", lambda r: sum(r.worker_rss), "<= 1.10"),
    ("workers' anonymous memory (sum)", lambda r: sum(r.worker_anon), "<= 1.10"),
    # Pages inherited from the fork server turn private as a worker writes them (copy on write:
    # Python's reference counts), RSS unchanged: ~2 MiB over thousands of cycles, of ~20.
    ("workers' private memory (sum)", lambda r: sum(r.worker_private), "info"),
    ("daemon fds", lambda r: r.daemon_fds, "equal"),
    ("workers' fds (sum)", lambda r: sum(r.worker_fds), "equal"),
    ("deployd segments in /dev/shm", lambda r: r.segments, "equal"),
    ("deleted segments still mapped in workers", lambda r: r.deleted_maps, "equal"),
]


def verdict(readings: list[Reading]) -> list[str]:
    """The PASS/FAIL lines (a FAIL says what failed), and INFO lines."""
    lines = []
    window = max(1, min(WINDOW, len(readings) // 3))
    early, late = readings[:window], readings[-window:]
    # The cycles between the middles of the two windows, for the growth per cycle.
    cycles = statistics.median(r.cycle for r in late) - statistics.median(r.cycle for r in early)
    for what, figure, target in FIGURES:
        first = statistics.median(figure(r) for r in early)
        last = statistics.median(figure(r) for r in late)
        ratio = last / first if first else (1.0 if last == first else float("inf"))
        if target == "equal":
            judged = "PASS" if last == first else "FAIL"
            first_text, last_text, growth = f"{first:g}", f"{last:g}", ""
        else:
            judged = "INFO" if target == "info" else ("PASS" if ratio <= float(target.split()[1]) else "FAIL")
            first_text, last_text = f"{first / MIB:.1f} MiB", f"{last / MIB:.1f} MiB"
            growth = f"; {(last - first) / 1024 / max(cycles, 1):+.2f} KiB a cycle"
        judging = "not judged" if target == "info" else f"target {target}"
        lines.append(
            f"{judged} {what}: median of the last {window} readings / of the first {window}"
            f" = {last_text} / {first_text} = {ratio:.3f} ({judging}){growth}"
        )
    left_open = [(r.cycle + 1, r.open_sessions) for r in readings if r.open_sessions]
    lines.append(
        f"{'FAIL' if left_open else 'PASS'} open sessions between cycles: "
        + (f"{left_open[:5]} (cycle, open)" if left_open else "0 at every reading")
        + f"; the longest wait for them {max(r.waited for r in readings):.2f} s"
    )
    replaced = len({tuple(r.worker_pids) for r in readings}) > 1
    lines.append(f"{'FAIL' if replaced else 'PASS'} workers: {'replaced' if replaced else 'the same at every reading'}")
    return lines


SUITE = (1000, 300.0)  # cycles, seconds
SMOKE = (ABANDON_EVERY, 120.0)


def run(ctx: Context) -> None:
    cycles, budget = SMOKE if ctx.smoke else SUITE
    lines = churn(cycles, budget)
    for line in lines:
        ctx.report.line(f"session_churn: {line}")
    trends = tuple(f"FAIL {what}:" for what, _, _ in FIGURES)
    failed = [line for line in lines if line.startswith("FAIL") and not (ctx.smoke and line.startswith(trends))]
    if failed:
        raise AssertionError("session churn: " + "; ".join(failed))


def main(cycles: int, budget: float) -> int:
    lines = churn(cycles, budget)
    print("\n".join(lines))
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


def churn(cycles: int, budget: float) -> list[str]:
    """Run the cycles against a daemon of its own; the verdict's lines (module docstring)."""
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "config.yaml"
        settings = {
            "pool": {"workers": WORKERS},
            "packages": {"directory": work},
            "server": {"log_calls": False, "shutdown_grace_seconds": 5.0},
        }
        config.write_text(yaml.safe_dump(settings))
        daemon = DaemonProcess(config).start()
        readings: list[Reading] = []
        try:
            with InterpreterManager(daemon.target, timeout=60) as manager:
                x = torch.randn(ROWS, WIDTH)
                print(
                    f"session churn: {cycles} cycles (at most {budget:.0f} s), {WORKERS} workers, daemon pid"
                    f" {daemon.pid}; a reading every {READ_EVERY} cycles, a row every {PRINT_EVERY}",
                    flush=True,
                )
                print(HEADER, flush=True)
                started = time.monotonic()
                done = 0
                for cycle in range(cycles):
                    one_cycle(manager, cycle, x)
                    done = cycle + 1
                    last_one = done == cycles or time.monotonic() - started > budget
                    if done % READ_EVERY == 0 or last_one:
                        readings.append(read(manager, daemon.pid, cycle, started))
                        if done % PRINT_EVERY == 0 or last_one or done == READ_EVERY:
                            print(row(readings[-1]), flush=True)
                    if last_one:
                        break
                elapsed = time.monotonic() - started
                if done < cycles:
                    print(f"stopped at the time budget ({budget:.0f} s) after {done} of {cycles} cycles")
                print(f"{done} cycles in {elapsed:.0f} s: {elapsed / done * 1000:.0f} ms a cycle")
        finally:
            daemon.assert_clean_stop()
    return verdict(readings)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000, float(sys.argv[2]) if len(sys.argv) > 2 else 900))
