"""Regenerate the blocking client from the asyncio one (never edit the generated files).

client/aio/_manager.py and client/aio/_sessions.py are the one source of both Python clients,
as httpcore does it: unasync rewrites them token by token into client/_manager.py and
client/_sessions.py (`async` and `await` dropped, `__aenter__` -> `__enter__`, `AsyncIterator`
-> `Iterator`, and the classes' `Async` names made plain, below). The rewrite is nothing more:
where the two clients truly differ, the source imports the difference from `._backend`, which
is client/aio/_backend.py for the source and client/_backend.py for the generated copy. Each
generated file starts with a header naming its source, and is put through `ruff check --fix`
and `ruff format` so that it passes the project's lint as generated. `--check` generates into
memory and fails if the checked-in files differ: `make lint` runs it.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import tokenize
from pathlib import Path

import unasync

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = ROOT / "client" / "aio"
TARGET_DIR = ROOT / "client"
MODULES = ["_manager.py", "_sessions.py"]
# Beyond unasync's own (__aenter__, __aexit__, AsyncIterator, ...): the public classes' names.
REPLACEMENTS = {
    "AsyncInterpreterManager": "InterpreterManager",
    "AsyncInterpreterSession": "InterpreterSession",
    "AsyncObj": "Obj",
    "AsyncPackage": "Package",
    "AsyncReplicatedObj": "ReplicatedObj",
    "AsyncWorkerInstance": "WorkerInstance",
}
# Names that must not survive into blocking code: the source reaches asyncio and grpc.aio only
# through ._backend, and every Async class has its plain name above (unasync would otherwise
# make an unknown AsyncFoo into SyncFoo).
LEAKS = {"async", "await", "asyncio", "aio"}
HEADER = (
    "# Generated from client/aio/{name} by scripts/generate_sync_client.py (unasync): never edit it.\n"
    "# Edit the asyncio source, then run `python scripts/generate_sync_client.py`.\n"
)


def _unasync(source: Path) -> str:
    """source rewritten by unasync's rule (it writes files only, so into a temporary folder)."""
    with tempfile.TemporaryDirectory() as out:
        rule = unasync.Rule(fromdir=f"{SOURCE_DIR}/", todir=f"{out}/", additional_replacements=REPLACEMENTS)
        unasync.unasync_files([str(source)], rules=[rule])
        return (Path(out) / source.name).read_text()


def _check_no_leaks(name: str, text: str) -> None:
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        word = token.string
        if token.type == tokenize.NAME and (word in LEAKS or word.startswith(("Async", "Sync"))):
            line, column = token.start
            raise SystemExit(
                f"client/{name}:{line}:{column}: {word!r} left in the blocking client: import the"
                " difference from ._backend, or add the name to REPLACEMENTS in this script"
            )


def _ruff(args: list[str], target: Path, text: str) -> str:
    command = [sys.executable, "-m", "ruff", *args, "--stdin-filename", str(target), "-"]
    done = subprocess.run(command, input=text, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"ruff {args[0]} failed on the generated {target.relative_to(ROOT)}:\n{done.stderr}")
    return done.stdout


def generate(name: str) -> str:
    """The blocking client's module `name`, as it should be checked in."""
    target = TARGET_DIR / name
    text = HEADER.format(name=name) + _unasync(SOURCE_DIR / name)
    _check_no_leaks(name, text)
    text = _ruff(["check", "--fix", "--quiet"], target, text)  # e.g. imports re-sorted after renames
    return _ruff(["format", "--quiet"], target, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the checked-in blocking client is stale")
    options = parser.parse_args()
    stale = []
    for name in MODULES:
        target = TARGET_DIR / name
        text = generate(name)
        if options.check:
            if not target.exists() or target.read_text() != text:
                stale.append(str(target.relative_to(ROOT)))
        else:
            target.write_text(text)
    if stale:
        print("stale generated client (run: python scripts/generate_sync_client.py):", *stale, sep="\n  ")
        return 1
    print("generated blocking client is current" if options.check else "generated the blocking client")
    return 0


if __name__ == "__main__":
    sys.exit(main())
