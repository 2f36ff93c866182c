"""The daemon's command line: `serve` runs it (`python -m server serve`, and `deployd serve`).

The operator commands (status, load, unload, invoke, reload, health) are a client of the daemon
and live in deployd_cli, which adds this `serve` to the one `deployd` parser: the server never
imports the client. Nothing here loads torch or grpc before the config is good.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from server import logs
from server.app.config import Config, ConfigError, load_config
from server.app.exit_codes import ExitCode


def add_serve_command(commands: Any) -> None:
    """Add `serve` to a parser's subparsers (deployd_cli's, or build_parser's here)."""
    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="config file (default: $DEPLOYD_CONFIG, else built-in defaults)")
    serve.add_argument("--address", help="host:port to serve gRPC on (port 0: any free port)")
    serve.add_argument("--workers", type=int, help="number of worker processes (0: one per core)")
    serve.add_argument("--metrics-address", help="host:port for Prometheus metrics (empty: off)")
    serve.add_argument("--http-address", help="host:port for KServe v2 over HTTP/REST (port 0: any free; empty: off)")
    serve.add_argument(
        "--data-ports", type=int, help="workers serve calls on ports P..P+N-1 (0: any free ones, -1: none)"
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser() -> argparse.ArgumentParser:
    """`python -m server`'s parser: `serve` only (the operator commands: `deployd`, deployd_cli)."""
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve torch.package models over gRPC.",
        epilog="The operator commands (status, load, unload, invoke, reload, health): `deployd`"
        " (python -m deployd_cli).",
    )
    add_serve_command(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: list[str] | None = None) -> int:
    return serve(build_parser().parse_args(argv))


def serve(options: argparse.Namespace) -> int:
    """Run the daemon as `serve`'s options say; returns the exit code."""
    logs.start(options.log_level)
    try:
        return _serve(options)
    finally:
        logs.stop()  # the last lines ("stopped") are written before the process ends


def _serve(options: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for flag, key in (
        ("address", "server.address"),
        ("workers", "pool.workers"),
        ("metrics_address", "metrics.address"),
        ("http_address", "server.http_address"),
        ("data_ports", "pool.data_ports"),
    ):
        if getattr(options, flag) is not None:
            overrides[key] = getattr(options, flag)
    config_path = options.config or os.environ.get("DEPLOYD_CONFIG")
    try:
        config = load_config(config_path, overrides=overrides)
    except ConfigError as error:
        print(f"deployd: {error}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    from server.app.daemon import run_daemon  # grpc and the pool only once the config is good

    def reload_config() -> Config:
        return load_config(config_path, overrides=overrides)

    return run_daemon(config, reload_config if config_path else None)
