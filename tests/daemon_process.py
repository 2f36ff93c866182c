"""Run the real daemon as a subprocess for tests: start on port 0, stop, check what it left."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from server.pool.procinfo import alive, descendants_of

REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_HTTP = re.compile(r"http on (\S+):(\d+)")  # logged before "listening on"


def wait_until(condition, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def shm_segments() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


class DaemonProcess:
    def __init__(self, config_path: Path, *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.extra_args = extra_args
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self.port = 0
        self.http_port = 0  # with server.http_address
        self._listening = threading.Event()
        self._shm_before = shm_segments()
        self.process: subprocess.Popen[str] | None = None
        self.children: set[int] = set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        assert self.http_port, "the daemon serves no HTTP (server.http_address)"
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        serve = [sys.executable, "-m", "server", "serve", "--config", str(self.config_path)]
        return [*serve, "--address", "127.0.0.1:0", *self.extra_args]

    def start(self, timeout: float = 90.0) -> DaemonProcess:
        self.process = subprocess.Popen(
            self.command(),
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._log_reader = threading.Thread(target=self._read_log, daemon=True)
        self._log_reader.start()
        if not wait_until(lambda: self._listening.is_set() or self.process.poll() is not None, timeout):  # type: ignore[union-attr]
            self.kill()
            raise AssertionError(f"daemon did not start in {timeout}s:\n{self.log}")
        if not self._listening.is_set():
            raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log}")
        return self

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        with self.process.stderr:
            for line in self.process.stderr:
                self.lines.append(line)
                http = _HTTP.search(line)
                if http and not self.http_port:
                    self.http_port = int(http.group(2))
                match = _LISTENING.search(line)
                if match and not self._listening.is_set():
                    self.port = int(match.group(2))
                    self._listening.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait; returns the exit code (kills and fails if it hangs)."""
        assert self.process is not None
        self.children = descendants_of(self.pid)
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
            self._log_reader.join(10)
            return code
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not stop in {timeout}s:\n{self.log}") from None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.children |= descendants_of(self.pid)
            self.process.kill()
            self.process.wait(10)
        for pid in self.children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    def leftovers(self, timeout: float = 10.0) -> tuple[set[int], set[str]]:
        """Child processes still alive, and shared-memory segments this daemon or its children made.

        Only names that carry one of their pids count: other programs on the machine
        (a benchmark, another test run) may make and remove segments meanwhile.
        """
        wait_until(lambda: not any(alive(pid) for pid in self.children), timeout)
        ours = {str(pid) for pid in self.children | {self.pid}}
        segments = {name for name in shm_segments() - self._shm_before if set(re.findall(r"\d+", name)) & ours}
        return {pid for pid in self.children if alive(pid)}, segments

    def assert_clean_stop(self) -> None:
        code = self.stop()
        processes, segments = self.leftovers()
        self.kill()  # whatever is left, so one failure does not leak into the next test
        assert code == 0, f"daemon exited with {code}:\n{self.log}"
        assert not processes, f"child processes left behind: {processes}"
        assert not segments, f"shared-memory segments left behind: {segments}"
