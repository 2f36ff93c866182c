"""Regenerate the gRPC stubs from protos/ (never edit the generated files).

All stubs have one home, `deployd_wire/proto/`, beside the rest of the wire format: the daemon
and the client both import deployd.v1's from there (neither imports the other). KServe v2's
(protos/inference/, vendored) are there too; only the daemon imports them (its clients are
tritonclient and the like). `--check` regenerates into a temporary directory and fails if the
checked-in files differ: CI runs it.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
TARGET = ROOT / "deployd_wire" / "proto"
PROTOS = ["deployd/v1/deployd.proto", "inference/grpc_predict_v2.proto"]  # under protos/
INIT_TEXT = '"""Generated from protos/ by scripts/generate_protos.py: never edit these files."""\n'


def _generated(proto: str) -> list[str]:
    stem = Path(proto).stem
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def _expected() -> list[str]:
    return [name for proto in PROTOS for name in _generated(proto)]


def generate(out_dir: Path) -> None:
    """Run protoc for every proto into out_dir, flattening package paths, imports made relative."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        with tempfile.TemporaryDirectory() as raw:
            args = [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"--python_out={raw}",
                f"--pyi_out={raw}",
                f"--grpc_python_out={raw}",
                proto,
            ]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed on {proto}")
            package = str(Path(proto).parent).replace("/", ".")
            for name in _generated(proto):
                text = (Path(raw) / Path(proto).parent / name).read_text()
                # protoc writes absolute imports ("from deployd.v1 import ..."); the stubs live
                # inside our packages, so point them at their siblings instead.
                text = re.sub(rf"^from {re.escape(package)} import", "from . import", text, flags=re.M)
                (out_dir / name).write_text(text)
    (out_dir / "__init__.py").write_text(INIT_TEXT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if checked-in stubs are stale")
    options = parser.parse_args()
    if not options.check:
        generate(TARGET)
        return 0
    with tempfile.TemporaryDirectory() as fresh:
        generate(Path(fresh))
        stale = [
            str(TARGET / name)
            for name in [*_expected(), "__init__.py"]
            if not (TARGET / name).exists() or not filecmp.cmp(Path(fresh) / name, TARGET / name, shallow=False)
        ]
    if stale:
        print("stale generated stubs (run: python scripts/generate_protos.py):", *stale, sep="\n  ")
        return 1
    print("generated stubs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
