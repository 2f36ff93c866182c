"""HTTP churn: KServe v2 over HTTP for ROUNDS rounds against one daemon (2 workers, the seed
model by name, HTTP on 127.0.0.1 port 0): its memory, fds and /dev/shm segments stay flat.

Each round sends CALLS JSON infers of the seed model, each on a connection of its own (opened
and closed: what curl and probes do), then CYCLES times loads a second name through the
repository extension (POST /v2/repository/models/extra/load with the entry in its config
parameter), infers on it, unloads it, and checks that an infer on it is then 404. After each
round: the daemon's RSS, its fds and the daemon's deployd segments in /dev/shm. At the end, the
last round against the first: RSS within 1.10x, fds and segments equal; exits 1 otherwise.

    python -m bench.http_churn [ROUNDS] [CALLS] [CYCLES]      (default 6, 2000, 100)
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.http_v2 import HttpSeedDaemon
from bench.v2load import export_seed

SHAPE = [1, 1, 10, 10]
ROUND_SECONDS = 600.0  # each round's bound in time


def request(port: int, method: str, path: str, body: str | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def expect(status: int, answer: tuple[int, bytes], what: str) -> None:
    if answer[0] != status:
        raise AssertionError(f"{what}: {answer[0]} {answer[1][:300]!r}, not {status}")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


def main(rounds: int, calls: int, cycles: int) -> int:
    with tempfile.TemporaryDirectory(prefix="deployd-http-churn-") as work:
        package = export_seed(Path(work) / "packages")
        with HttpSeedDaemon(Path(work), 2, package) as daemon:
            port, pid = daemon.http_port, daemon.pid
            infer = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": SHAPE, "data": [0.5] * 100}]})
            entry = json.dumps({"package": "seed.pt", "pickle": "model:model.pkl"})
            load = json.dumps({"parameters": {"config": entry}})
            readings = []
            for index in range(rounds):
                started = time.monotonic()
                for _ in range(calls):
                    expect(200, request(port, "POST", "/v2/models/seed/infer", infer), "an infer")
                    if time.monotonic() - started > ROUND_SECONDS:
                        raise AssertionError(f"round {index} ran past {ROUND_SECONDS:.0f} s")
                for _ in range(cycles):
                    expect(200, request(port, "POST", "/v2/repository/models/extra/load", load), "a load")
                    expect(200, request(port, "POST", "/v2/models/extra/infer", infer), "an infer of extra")
                    expect(200, request(port, "POST", "/v2/repository/models/extra/unload"), "an unload")
                    expect(404, request(port, "POST", "/v2/models/extra/infer", infer), "an infer after unload")
                segments = sum(name.startswith(f"deployd-{pid}-") for name in os.listdir("/dev/shm"))
                reading = (rss_kib(pid), len(os.listdir(f"/proc/{pid}/fd")), segments)
                readings.append(reading)
                print(
                    f"http_churn: round {index}: {calls} infers, {cycles} load/infer/unload in"
                    f" {time.monotonic() - started:.1f} s; daemon RSS {reading[0] / 1024:.1f} MiB,"
                    f" fds {reading[1]}, segments {reading[2]}",
                    flush=True,
                )
    first, last = readings[0], readings[-1]
    growth = (last[0] - first[0]) / max(1, (rounds - 1) * (calls + cycles))
    checks = [
        (
            f"daemon RSS {first[0] / 1024:.1f} -> {last[0] / 1024:.1f} MiB ({growth * 1024:.0f} B a call)",
            last[0] <= 1.10 * first[0],
        ),
        (f"daemon fds {first[1]} -> {last[1]}", last[1] <= first[1]),
        (f"daemon segments {first[2]} -> {last[2]}", last[2] <= first[2]),
    ]
    for what, ok in checks:
        print(f"http_churn: {what}: {'PASS' if ok else 'FAIL'}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    numbers = [int(arg) for arg in sys.argv[1:4]]
    sys.exit(main(*numbers) if numbers else main(6, 2000, 100))
