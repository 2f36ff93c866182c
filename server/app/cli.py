"""The `deployd` command line (also `python -m server`): `serve` runs the daemon; status, load,
unload, invoke and health are operator commands, a client of the daemon (client/cli.py)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from server import logs
from server.app.config import Config, ConfigError, load_config
from server.app.exit_codes import ExitCode


def build_parser(*, client_commands: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deployd",
        description="Serve torch.package models over gRPC, and operate a running daemon.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    if client_commands:
        # The operator commands are a client of the daemon, and the daemon core never imports
        # the client: this command line is the one place where the two meet. Imported only
        # here, so that `deployd serve` loads neither the client nor torch.
        from client import cli as client_cli

        client_cli.add_commands(commands)
        parser.epilog = client_cli.EPILOG
    return parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    options = build_parser(client_commands=args[:1] != ["serve"]).parse_args(args)
    if options.command != "serve":
        from client import cli as client_cli  # see build_parser

        return client_cli.run(options)
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
