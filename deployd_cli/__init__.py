"""The `deployd` command line: `serve` runs the daemon; status, load, unload, invoke, reload and
health operate a running one. It is neither server nor client, and imports both: the server and
the client never import each other (tests/test_layers.py).

- `deployd_cli.main`: the one `deployd` parser and its entry point (`python -m deployd_cli`).
  `serve` is server.app.cli's; the operator commands are imported only for them, so that
  `deployd serve` loads neither the client nor torch.
- `deployd_cli.commands`: the operator commands, their options and exit codes (a client of the
  daemon, built on the public client).
- `deployd_cli.tensor_args`: `invoke`'s help on ARGs and its results as JSON (the ARG parser: deployd_wire.tensor_args).
- `deployd_cli.status_view`: how `status` shows the daemon (JSON, or tables).
"""
