"""Run one benchmark function in this process: python -m bench.child MODULE:FUNCTION SPEC RESULT LIFETIME

The supervisor (bench.common.Child) starts this for every load generator and package
build. SPEC is the function's JSON argument; its JSON return value is written to the
file RESULT. An alarm ends the process after LIFETIME seconds, even if the supervisor
is gone.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
import warnings
from pathlib import Path

_GRACE_SECONDS = 30


def main(argv: list[str]) -> int:
    target, spec, result_path, lifetime = argv
    signal.alarm(int(lifetime) + _GRACE_SECONDS)
    # torch.package's pickles still use TypedStorage; the warning says nothing here.
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(json.loads(spec))
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
