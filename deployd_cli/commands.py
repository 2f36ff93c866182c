"""The operator commands of `deployd`: status, load, unload, invoke, health.

They are a client of a running daemon, built on the public client (InterpreterManager);
deployd_cli.main adds them to the one `deployd` parser,
beside server.app.cli's `serve`, and calls run(). What an ARG may be is deployd_wire.tensor_args;
how status prints is deployd_cli.status_view.

    deployd status                                   workers, models, packages, objects, modules, queue
    deployd load PACKAGE [--server-path] [--pickle MODULE:FILE ...] [--name NAME [--batching ROWS[:DELAY_MS]]]
                 [--workers N|SLOT,SLOT...] [--device cpu|cuda|cuda:N|auto]
    deployd unload (TARGET | --model NAME | --object ID | --package ID)
    deployd invoke TARGET [--version N] [--method NAME] [--kwarg NAME=ARG ...] [--full] [ARG ...]
    deployd health [--service NAME]                  exit 0 only when SERVING

A TARGET is a model name (its serving version, or the one --version pins), an object id
(`obj-<16 hex>`) or, for unload, a package id (64 hex digits): the form tells which.
`load --pickle MODULE:FILE --name NAME` serves the object as NAME's next version (the version it
replaces finishes its running calls, then is unloaded).

Common options: --address (default $DEPLOYD_ADDRESS, else 127.0.0.1:50051), --token (default
$DEPLOYD_TOKEN; never printed), --tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name,
--timeout SECONDS (default 30, health 5; 0: none), --json (machine-readable stdout).

An ARG (and the value of a --kwarg) is JSON (`2`, `1.5`, `'"text"'`, `true`, `null`, `[1, 2]`,
`{"k": 1}`) or a tensor: `tensor:[[1,2],[3,4]]` (float32 from nested JSON lists),
`tensor:int64:[1,2]` (any dtype below), `ones:1,3,8,8`, `zeros:2,2`, `rand:2,3` (float32 of that
shape; `ones:int64:2,2` names a dtype). Results print as one line of JSON: a tensor as
{"tensor": {"dtype", "shape", "values"}}, tuples as lists, bytes as {"bytes_base64": ...}.

Exit codes (EXIT_CODES is the one table, and the --help epilog):
    0  success
    1  the daemon answered with an error (stderr: "deployd: CODE: details"), UNAVAILABLE
       included when the daemon sent it (a worker died during the call, it is stopping)
    2  usage error, or bad local input (a missing package file, a malformed ARG)
    3  the daemon is unreachable (UNAVAILABLE and no connection comes up), or the deadline passed
    4  health: the service is not SERVING
    5  UNAUTHENTICATED or PERMISSION_DENIED
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import grpc

from client import TLS, Batching, DeployError, InterpreterManager, Package, ReplicatedObj
from deployd_cli.status_view import status_report, status_text
from deployd_cli.tensor_args import ARGS_HELP, MAX_PRINTED_VALUES, to_json
from deployd_wire.tensor_args import BadArg, parse_arg

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_SECONDS = 30.0
HEALTH_TIMEOUT_SECONDS = 5.0  # Docker's HEALTHCHECK runs `deployd health`: fail fast
_REACHABLE_PROBE_SECONDS = 2.0

EXIT_OK = 0
EXIT_DAEMON_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_SERVING = 4
EXIT_DENIED = 5

# The one table: what each exit code means, and which gRPC statuses lead to it.
EXIT_CODES: list[tuple[int, str, tuple[grpc.StatusCode, ...]]] = [
    (EXIT_OK, "success", (grpc.StatusCode.OK,)),
    (EXIT_DAEMON_ERROR, "the daemon answered with an error (any other status; UNAVAILABLE: a worker died)", ()),
    (EXIT_USAGE, "usage error, or bad local input (missing package file, malformed ARG)", ()),
    (
        EXIT_UNREACHABLE,
        "the daemon is unreachable, or the deadline passed",
        # UNAVAILABLE that the daemon itself sent (a worker died, it is stopping): 1, see _report
        (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED),
    ),
    (EXIT_NOT_SERVING, "health: the service is not SERVING (or unknown)", ()),
    (
        EXIT_DENIED,
        "UNAUTHENTICATED or PERMISSION_DENIED",
        (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED),
    ),
]
_EXIT_FOR_STATUS = {status: exit_code for exit_code, _, statuses in EXIT_CODES for status in statuses}

EPILOG = "exit codes:\n" + "\n".join(f"  {exit_code}  {meaning}" for exit_code, meaning, _ in EXIT_CODES)

# What a TARGET's form says it is (server/models/names.py: no model name starts with "obj-").
_PACKAGE_ID = re.compile(r"[0-9a-f]{64}")
_OBJECT_ID_PREFIX = "obj-"

UNLOAD_DETAILS = """

TARGET's form says what it is: 64 hex digits a package id (the package and every object loaded
from it), obj-<16 hex> an object id, anything else a model name (every version of it).
--model, --object and --package say it outright."""


class UsageError(Exception):
    """Bad local input: exit 2 before anything is sent."""


class _InvokeParser(argparse.ArgumentParser):
    """argparse takes positionals only before the first option, so `invoke OBJ --method m ARG`
    would leave ARG unrecognized: take such leftovers as further ARGs, in order. Leftovers
    that look like options (other than negative numbers) stay unrecognized: a usage error."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = super().parse_known_args(args, namespace)
        unknown = [text for text in extras if text.startswith("-") and not self._negative_number_matcher.match(text)]
        parsed.args = [*parsed.args, *(text for text in extras if text not in unknown)]
        return parsed, unknown


def exit_code_for(status: grpc.StatusCode) -> int:
    return _EXIT_FOR_STATUS.get(status, EXIT_DAEMON_ERROR)


# ---------------------------------------------------------------- parser


def add_commands(subparsers: Any) -> None:
    """Add status, load, unload, invoke and health to the `deployd` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    connection = common.add_argument_group("connection")
    connection.add_argument(
        "--address",
        default=os.environ.get("DEPLOYD_ADDRESS") or DEFAULT_ADDRESS,
        help=f"the daemon's host:port (default: $DEPLOYD_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    connection.add_argument("--token", help="bearer token (default: $DEPLOYD_TOKEN, which keeps it out of ps)")
    connection.add_argument("--tls", action="store_true", help="connect with TLS (implied by any --tls-* option)")
    connection.add_argument("--tls-ca", metavar="PEM", help="CA that signed the daemon's certificate")
    connection.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mutual TLS")
    connection.add_argument("--tls-key", metavar="PEM", help="client key, for mutual TLS")
    connection.add_argument("--tls-server-name", metavar="NAME", help="name to check the daemon's certificate against")
    connection.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help=f"deadline of each call (default {DEFAULT_TIMEOUT_SECONDS:g}, health {HEALTH_TIMEOUT_SECONDS:g}; 0: none)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], summary: str, details: str = ""
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subparsers.add_parser(
            name,
            parents=[common],
            help=summary,
            description=summary + details,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.set_defaults(handler=handler)
        return parser

    add("status", _status, "show the daemon's workers, models, packages, objects, modules and queued calls")

    load = add("load", _load, "load a torch.package archive, and optionally unpickle objects from it")
    load.add_argument("package", metavar="PACKAGE", help="a local .pt file (with --server-path: a path on the daemon)")
    load.add_argument("--server-path", action="store_true", help="PACKAGE is a path in the daemon's packages.directory")
    load.add_argument(
        "--pickle",
        action="append",
        default=[],
        metavar="MODULE:FILE",
        help="unpickle this object from the package (repeatable); prints its object id",
    )
    load.add_argument(
        "--name",
        metavar="NAME",
        help="serve the one --pickle object as this model's next version; prints its version",
    )
    load.add_argument(
        "--batching",
        metavar="ROWS[:DELAY_MS]",
        help="with --name: batch its concurrent calls, up to ROWS rows a batch, the first waiting"
        " up to DELAY_MS (default 2) for company",
    )
    load.add_argument(
        "--workers",
        metavar="N|SLOT,SLOT...",
        help="place the --pickle objects: on N workers the daemon picks (--workers 2), or on those worker"
        " slots (--workers 0,2; one slot: --workers 1,); default: every worker",
    )
    load.add_argument(
        "--device",
        metavar="cpu|cuda|cuda:N|auto",
        help="where the --pickle objects run: cpu (default), cuda (any of the pool's GPUs), cuda:N (the workers"
        " bound to GPU N: pool.gpus) or auto (cuda if the pool has GPUs, else cpu)",
    )

    unload = add(
        "unload",
        _unload,
        "unload a model name with every version, an object, or a package and every object loaded from it",
        UNLOAD_DETAILS,
    )
    unload.add_argument(
        "target", nargs="?", metavar="TARGET", help="a model name, an object id or a package id (by its form)"
    )
    which = unload.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="NAME", help="the model to unload, every version of it")
    which.add_argument("--object", metavar="ID", help="the object to unload")
    which.add_argument("--package", metavar="ID", help="the package to unload, with its objects")

    invoke = add("invoke", _invoke, "call a model or a loaded object and print the result as JSON", ARGS_HELP)
    invoke.__class__ = _InvokeParser  # add_parser makes every subparser of one class
    invoke.add_argument("target", metavar="TARGET", help="a model name, or an object id (obj-...)")
    invoke.add_argument(
        "--version",
        type=int,
        default=0,
        metavar="N",
        help="call this version of the model while it is loaded (default 0: the serving one)",
    )
    invoke.add_argument(
        "args", nargs="*", metavar="ARG", help="JSON, or tensor:[...], tensor:DTYPE:[...], ones:/zeros:/rand:SHAPE"
    )
    invoke.add_argument("--method", default="__call__", help="the method to call (default: __call__)")
    invoke.add_argument(
        "--kwarg", action="append", default=[], metavar="NAME=ARG", help="a keyword argument (repeatable)"
    )
    invoke.add_argument("--full", action="store_true", help=f"print every value of tensors over {MAX_PRINTED_VALUES}")

    add(
        "reload",
        _reload,
        "have the daemon re-read its config file's models: (as SIGHUP does); exit 1 if one failed",
    )

    health = add("health", _health, "check grpc.health.v1 (needs no token); exit 0 only when SERVING")
    health.add_argument(
        "--service",
        default="",
        help='"" (default): the whole server; or deployd.v1.Deployd, deployd.v1.Deployd/capacity, a model name'
        " or an object id",
    )


def run(options: argparse.Namespace) -> int:
    """Run the command that add_commands' parser parsed; returns the exit code."""
    try:
        return int(options.handler(options))
    except (UsageError, BadArg, OSError) as error:  # OSError: a local file (package, TLS) that cannot be read
        print(f"deployd: {error}", file=sys.stderr)
        return EXIT_USAGE
    except DeployError as error:
        return _report(error, options)


def _report(error: DeployError, options: argparse.Namespace) -> int:
    exit_code = exit_code_for(error.code)
    if error.code == grpc.StatusCode.UNAVAILABLE and (error.call_killed_worker or _reachable(options)):
        exit_code = EXIT_DAEMON_ERROR  # the daemon itself answered: a worker died, or it is stopping
    where = f" (daemon at {options.address})" if exit_code == EXIT_UNREACHABLE else ""
    print(f"deployd: {error}{where}", file=sys.stderr)
    for note in getattr(error, "__notes__", ()):
        print(f"deployd: {note}", file=sys.stderr)
    return exit_code


# ---------------------------------------------------------------- connection


def _tls(options: argparse.Namespace) -> TLS | None:
    paths = (options.tls_ca, options.tls_cert, options.tls_key, options.tls_server_name)
    if not options.tls and all(path is None for path in paths):
        return None
    for flag, path in (("--tls-ca", options.tls_ca), ("--tls-cert", options.tls_cert), ("--tls-key", options.tls_key)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{flag}: no such file: {path!r}")
    try:
        return TLS(ca=options.tls_ca, cert=options.tls_cert, key=options.tls_key, server_name=options.tls_server_name)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _timeout(options: argparse.Namespace, default: float) -> float | None:
    if options.timeout is None:
        return default
    if options.timeout < 0 or not math.isfinite(options.timeout):
        raise UsageError(f"--timeout must be a number of seconds >= 0, not {options.timeout}")
    return options.timeout or None


def _manager(options: argparse.Namespace) -> InterpreterManager:
    return InterpreterManager(
        options.address,
        timeout=_timeout(options, DEFAULT_TIMEOUT_SECONDS),
        token=options.token,  # None: $DEPLOYD_TOKEN
        tls=_tls(options),
    )


def _channel(options: argparse.Namespace) -> grpc.Channel:
    tls = _tls(options)
    if tls is None:
        return grpc.insecure_channel(options.address)
    return grpc.secure_channel(options.address, tls.channel_credentials(), options=tls.channel_options())


def _reachable(options: argparse.Namespace) -> bool:
    """Whether a connection to the daemon comes up: tells an UNAVAILABLE the daemon sent (a
    worker died, it is stopping) from one gRPC made up because it could not connect."""
    with _channel(options) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=_REACHABLE_PROBE_SECONDS)
        except grpc.FutureTimeoutError:
            return False
    return True


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False))


# ---------------------------------------------------------------- status


def _status(options: argparse.Namespace) -> int:
    with _manager(options) as manager:
        status = manager.status()
    report = status_report(status)
    if options.json:
        _print_json(report)
    else:
        print(status_text(report))
    return EXIT_OK


# ---------------------------------------------------------------- load, unload


def _batching(spec: str) -> Batching:
    rows, _, delay = spec.partition(":")
    try:
        return Batching(int(rows), float(delay) if delay else 2.0)
    except ValueError:
        raise UsageError(f"--batching takes ROWS[:DELAY_MS] (e.g. 32:2), not {spec!r}") from None


def _placement(spec: str) -> int | list[int]:
    """--workers: N, or a comma-separated list of slots ("0,2", or "1," for slot 1 alone)."""
    try:
        if "," not in spec:
            return int(spec)
        return [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--workers takes N or SLOT,SLOT... (e.g. 2, or 0,2), not {spec!r}") from None


def _load(options: argparse.Namespace) -> int:
    pickles = [_module_and_file(spec) for spec in options.pickle]
    workers = _placement(options.workers) if options.workers is not None else None
    if workers is not None and not pickles:
        raise UsageError("--workers places objects: give --pickle MODULE:FILE too")
    if options.device is not None and not pickles:
        raise UsageError("--device places objects: give --pickle MODULE:FILE too")
    if options.name is not None and len(pickles) != 1:
        raise UsageError(f"--name serves one object: give exactly one --pickle MODULE:FILE, not {len(pickles)}")
    batching = _batching(options.batching) if options.batching is not None else None
    if batching is not None and options.name is None:
        raise UsageError("--batching is for a model with a name: give --name too")
    if not options.server_path:
        try:
            with open(options.package, "rb"):  # the client opens it lazily, inside the request stream
                pass
        except OSError as error:
            raise UsageError(f"cannot read package file {options.package!r}: {error.strerror or error}") from None
    with _manager(options) as manager:
        if options.server_path:
            package = manager.load_package(server_path=options.package)
        else:
            package = manager.load_package(options.package)
        objects: list[ReplicatedObj] = []
        try:
            for module, file in pickles:
                objects.append(
                    package.load_pickle(
                        module, file, name=options.name, batching=batching, workers=workers, device=options.device or ""
                    )
                )
        except DeployError as error:
            # All or nothing for the objects of this command (their ids are new); the package
            # stays: it is content-addressed, so others may hold objects from it. By object id:
            # a handle with a name would unload every version of it. (With --name there is one
            # object, so nothing to undo: a failed load leaves the name as it was.)
            for obj in objects:
                with contextlib.suppress(DeployError):
                    ReplicatedObj(manager, obj.object_id).unload()
            error.add_note(f"package {package.id} stays loaded; no object of this command was kept")
            raise
    if options.json:
        _print_json(
            {
                "package_id": package.id,
                "objects": [
                    # name null and version 0: an anonymous object, known by its id only
                    {
                        "module": module,
                        "file": file,
                        "object_id": obj.object_id,
                        "name": options.name,
                        "version": obj.version,
                    }
                    for (module, file), obj in zip(pickles, objects, strict=True)
                ],
            }
        )
    else:
        print(package.id)
        for obj in objects:  # named: "obj-... NAME version N"
            print(f"{obj.object_id} {options.name} version {obj.version}" if options.name else obj.object_id)
    return EXIT_OK


def _module_and_file(spec: str) -> tuple[str, str]:
    module, _, file = spec.partition(":")
    if not module or not file:
        raise UsageError(f"--pickle takes MODULE:FILE (e.g. models:model.pkl), not {spec!r}")
    return module, file


def _unload(options: argparse.Namespace) -> int:
    kind, target = _unload_target(options)
    with _manager(options) as manager:
        if kind == "model":
            ReplicatedObj(manager, target).unload()  # UnloadObject takes a name: every version
            report: dict[str, Any] = {"model": target}
        elif kind == "object":
            ReplicatedObj(manager, target).unload()
            report = {"object_ids": [target]}
        else:
            object_ids = Package(manager, target).unload()
            report = {"package_id": target, "object_ids": object_ids}
    if options.json:
        _print_json(report)
    else:
        if "model" in report:
            print(f"unloaded model {report['model']}")
        if "package_id" in report:
            print(f"unloaded package {report['package_id']}")
        for object_id in report.get("object_ids", ()):
            print(f"unloaded object {object_id}")
    return EXIT_OK


def _unload_target(options: argparse.Namespace) -> tuple[str, str]:
    """("model" | "object" | "package", the target): from the flag given, else from TARGET's form."""
    flags = [(kind, value) for kind in ("model", "object", "package") if (value := getattr(options, kind)) is not None]
    if (options.target is None) == (not flags):
        raise UsageError("unload takes one TARGET, or one of --model NAME, --object ID, --package ID")
    if flags:
        return flags[0]
    target: str = options.target
    if _PACKAGE_ID.fullmatch(target):
        return "package", target
    if target.startswith(_OBJECT_ID_PREFIX):
        return "object", target
    return "model", target


# ---------------------------------------------------------------- invoke


def _invoke(options: argparse.Namespace) -> int:
    args = [parse_arg(text) for text in options.args]
    kwargs: dict[str, Any] = {}
    for spec in options.kwarg:
        name, equals, text = spec.partition("=")
        if not equals or not name.isidentifier():
            raise UsageError(f"--kwarg takes NAME=ARG (e.g. offset=1.5), not {spec!r}")
        kwargs[name] = parse_arg(text)
    if options.version < 0:
        raise UsageError(f"--version takes a version number >= 1 (0: the serving one), not {options.version}")
    with _manager(options) as manager:
        target = ReplicatedObj(manager, options.target, version=options.version)
        result = target.call_method(options.method, *args, **kwargs)
    _print_json(to_json(result, full=options.full))
    return EXIT_OK


# ---------------------------------------------------------------- reload


def _reload(options: argparse.Namespace) -> int:
    with _manager(options) as manager:
        report = manager.reload()
    failed = {failure.name: failure.error for failure in report.failed}
    outcome = {
        "loaded": list(report.loaded),
        "swapped": list(report.swapped),
        "unloaded": list(report.unloaded),
        "unchanged": list(report.unchanged),
        "failed": failed,
    }
    if options.json:
        _print_json(outcome)
    else:
        for what in ("loaded", "swapped", "unloaded", "unchanged"):
            print(f"{what}: {', '.join(outcome[what]) or '-'}")  # type: ignore[arg-type]
        for name, why in failed.items():
            print(f"failed: {name}: {why}")
    return EXIT_DAEMON_ERROR if failed else EXIT_OK


# ---------------------------------------------------------------- health


def _health(options: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    timeout = _timeout(options, HEALTH_TIMEOUT_SECONDS)
    request = health_pb2.HealthCheckRequest(service=options.service)
    with _channel(options) as channel:  # no token: health is open
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
            if code != grpc.StatusCode.NOT_FOUND:
                where = f" (daemon at {options.address})" if exit_code_for(code) == EXIT_UNREACHABLE else ""
                print(f"deployd: {code.name}: {error.details()}{where}", file=sys.stderr)  # type: ignore[attr-defined]
                return exit_code_for(code)
            status = "SERVICE_UNKNOWN"  # the daemon has no health status for that name
    if options.json:
        _print_json({"service": options.service, "status": status})
    else:
        print(status)
    return EXIT_OK if status == "SERVING" else EXIT_NOT_SERVING
