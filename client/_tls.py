"""TLS settings for the client's channel: the daemon's CA, and a client certificate for mutual TLS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TLS:
    """ca: PEM file of the CA that signed the daemon's certificate (None: the system's roots).
    cert, key: PEM files of this client's certificate and key, for a daemon that requires
    mutual TLS (tls.client_ca_file set). server_name: the name to check the daemon's
    certificate against, when it differs from the target's host."""

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS needs both cert and key for a client certificate, or neither")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
