"""python -m bench.direct_ab BASELINE [options]: the direct path of two checkouts side by side.

For a change to the data port's per-call cost, measured on a shared machine: this checkout's
daemon ("after") and one started from the BASELINE checkout ("before", e.g. the main worktree),
each with 2 workers and data ports, and bench.direct's 2 floor servers, all up at once. One load
generator (bench.direct's Balancer) calls each path in turn, in interleaved rounds (the order
turns every round), every window after an uncounted warm-up. Printed per model and calls in
flight: the medians of the within-round ratios of calls/s (after / before, before / floor,
after / floor), and CPU per call of the serving processes and of the load generator.

Not one of `python -m bench`'s benchmarks: a tool for comparing two versions of the code.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import subprocess
import sys
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import direct
from bench.common import DAEMON_PIDS
from bench.v2load import closed_loop, cpu_seconds

PATHS = ("before", "after", "floor")


class BaselineDaemon(direct.DirectDaemon):
    """bench.direct's daemon, run from another checkout (its code, this config)."""

    def __init__(self, checkout: Path, *args: Any) -> None:
        super().__init__(*args)
        self.checkout = checkout

    def launch(self) -> None:
        command = [sys.executable, "-m", "server", "serve", "--config", str(self.write_config())]
        command += ["--address", "127.0.0.1:0"]
        env = {**self.env, "PYTHONPATH": str(self.checkout)}
        self.process = subprocess.Popen(
            command,
            cwd=self.checkout,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        DAEMON_PIDS.add(self.process.pid)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.direct_ab", description=__doc__.split("\n")[0])
    parser.add_argument("baseline", type=Path, help="the checkout to compare with (its daemon is 'before')")
    parser.add_argument("--models", default="identity,seed", help="of: identity, seed")
    parser.add_argument("--levels", default="8,32", help="calls in flight, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.5, help="each measured window")
    options = parser.parse_args(argv)
    models = options.models.split(",")
    levels = [int(level) for level in options.levels.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="direct-ab-"))
    packages = direct.export_models(workdir / "packages")
    with ExitStack() as stack:
        args = (workdir, direct.WORKERS, packages[direct.SEED], packages[direct.IDENTITY])
        before = BaselineDaemon(options.baseline.resolve(), *args)
        after = direct.DirectDaemon(*args)
        floors = [direct.FloorServer(packages) for _ in range(direct.WORKERS)]
        for server in (before, after, *floors):
            stack.callback(server.stop)
            server.launch()
        before.wait_serving()
        after.wait_serving()
        for floor in floors:
            floor.wait_port()
        targets = {"before": before.target, "after": after.target}
        floor_targets = [floor.target for floor in floors]
        floor_pids = [floor.pid for floor in floors]
        asyncio.run(compare(targets, floor_targets, floor_pids, models, levels, options.rounds, options.seconds))
    return 0


async def compare(
    daemons: dict[str, str],
    floor_targets: list[str],
    floor_pids: list[int],
    models: list[str],
    levels: list[int],
    rounds: int,
    seconds: float,
) -> None:
    import grpc

    from deployd_wire.proto import deployd_pb2_grpc as pb_grpc

    _, requests = direct.invoke_requests()

    def stub(target: str) -> Any:
        return pb_grpc.DeploydStub(grpc.aio.insecure_channel(target, options=direct.CHANNEL_OPTIONS))

    invokes: dict[str, list[Any]] = {}
    pids: dict[str, list[int]] = {}
    for path, target in daemons.items():
        workers = await direct.data_ports(stub(target))
        invokes[path] = [stub(worker.address).Invoke for worker in workers]
        pids[path] = [worker.pid for worker in workers]
    invokes["floor"] = [stub(target).Invoke for target in floor_targets]
    pids["floor"] = floor_pids
    rates: dict[tuple[str, int], dict[str, list[float]]] = {}
    used: dict[tuple[str, int], dict[str, list[float]]] = {}  # path -> [server s, client s, calls]
    for round_index in range(rounds):
        for model in models:
            for level in levels:
                turn = round_index % len(PATHS)
                for path in PATHS[turn:] + PATHS[:turn]:
                    call = functools.partial(direct.Balancer(invokes[path]).call, requests[model])
                    await closed_loop(call, level, 0.3, 10**6, direct.CALL_TIMEOUT_S)
                    start = cpu_seconds(pids[path])
                    result = await closed_loop(call, level, seconds, 10**6, direct.CALL_TIMEOUT_S)
                    server_s = cpu_seconds(pids[path]) - start
                    key = (model, level)
                    rates.setdefault(key, {}).setdefault(path, []).append(result.calls / result.seconds)
                    total = used.setdefault(key, {}).setdefault(path, [0.0, 0.0, 0.0])
                    total[0] += server_s
                    total[1] += result.client_cpu_s
                    total[2] += result.calls
    for (model, level), by_path in rates.items():

        def ratio(a: str, b: str, by_path: dict[str, list[float]] = by_path) -> float:
            return statistics.median(x / y for x, y in zip(by_path[a], by_path[b], strict=True))

        cpu = used[(model, level)]
        per_call = "; ".join(
            f"{path} server {cpu[path][0] / cpu[path][2] * 1e6:.0f} client {cpu[path][1] / cpu[path][2] * 1e6:.0f}"
            for path in PATHS
        )
        print(
            f"{model}, {level} in flight: calls/s after / before {ratio('after', 'before'):.2f}x,"
            f" before / floor {ratio('before', 'floor'):.2f}x, after / floor {ratio('after', 'floor'):.2f}x"
            f" (medians of {rounds} rounds; calls/s "
            + ", ".join(f"{path} {statistics.median(by_path[path]):.0f}" for path in PATHS)
            + f"); CPU per call (us): {per_call}",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
