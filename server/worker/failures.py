"""A request a worker cannot serve, for a reason the daemon maps to a status code (not model code raising)."""

from __future__ import annotations


class RequestFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # one of server.ipc.protocol's FAILURE_* names
