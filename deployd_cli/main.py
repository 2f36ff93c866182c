"""The `deployd` entry point (pyproject's [project.scripts]; also `python -m deployd_cli`)."""

from __future__ import annotations

import argparse
import sys

from server.app import cli as server_cli

DESCRIPTION = "Serve torch.package models over gRPC, and operate a running daemon."


def build_parser(*, operator_commands: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deployd",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    server_cli.add_serve_command(commands)
    if operator_commands:
        # Imported only here, so that `deployd serve` loads neither the client nor torch.
        from deployd_cli import commands as operator

        operator.add_commands(commands)
        parser.epilog = operator.EPILOG
    return parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    options = build_parser(operator_commands=args[:1] != ["serve"]).parse_args(args)
    if options.command == "serve":
        return server_cli.serve(options)
    from deployd_cli import commands as operator  # see build_parser

    return operator.run(options)
