"""Regenerate the gRPC stubs from protos/ (never edit the generated files).

The same stubs are written into two places, `server/proto/` and `client/_proto/`,
so that the client package stands alone and the daemon never imports the client
(which imports torch). `--check` regenerates into a temporary directory and fails
if the checked-in files differ: CI runs it.
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
PROTO_FILE = "deployd/v1/deployd.proto"
TARGETS = [ROOT / "server" / "proto", ROOT / "client" / "_proto"]
GENERATED = ["deployd_pb2.py", "deployd_pb2.pyi", "deployd_pb2_grpc.py"]
INIT_TEXT = '"""Generated from protos/deployd/v1/deployd.proto by scripts/generate_protos.py."""\n'


def generate(out_dir: Path) -> None:
    """Run protoc into out_dir, flattening the package path and making imports relative."""
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (Path(raw) / "deployd" / "v1" / name).read_text()
            # protoc writes absolute imports ("from deployd.v1 import ..."); the stubs live
            # inside our packages, so point them at their siblings instead.
            text = re.sub(r"^from deployd\.v1 import", "from . import", text, flags=re.M)
            (out_dir / name).write_text(text)
        (out_dir / "__init__.py").write_text(INIT_TEXT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if checked-in stubs are stale")
    options = parser.parse_args()
    if not options.check:
        for target in TARGETS:
            generate(target)
        return 0
    with tempfile.TemporaryDirectory() as fresh:
        generate(Path(fresh))
        stale = [
            str(target / name)
            for target in TARGETS
            for name in [*GENERATED, "__init__.py"]
            if not (target / name).exists() or not filecmp.cmp(Path(fresh) / name, target / name, shallow=False)
        ]
    if stale:
        print("stale generated stubs (run: python scripts/generate_protos.py):", *stale, sep="\n  ")
        return 1
    print("generated stubs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
