"""The `deployd` command line (also `python -m server`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from server.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deployd", description="Serve torch.package models over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="config file (default: $DEPLOYD_CONFIG, else built-in defaults)")
    serve.add_argument("--address", help="host:port to serve gRPC on (port 0: any free port)")
    serve.add_argument("--workers", type=int, help="number of worker processes (0: one per core)")
    serve.add_argument("--metrics-address", help="host:port for Prometheus metrics (empty: off)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    logging.basicConfig(
        level=options.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    overrides: dict[str, Any] = {}
    for flag, key in (
        ("address", "server.address"),
        ("workers", "pool.workers"),
        ("metrics_address", "metrics.address"),
    ):
        if getattr(options, flag) is not None:
            overrides[key] = getattr(options, flag)
    try:
        config = load_config(options.config or os.environ.get("DEPLOYD_CONFIG"), overrides=overrides)
    except ConfigError as error:
        print(f"deployd: {error}", file=sys.stderr)
        return 2
    from server.daemon import run_daemon  # grpc and the pool only once the config is good

    return run_daemon(config)
