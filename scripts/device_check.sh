#!/usr/bin/env bash
# The device check (DEVELOPERS.md): the GPU tests and numbers, on a machine with one GPU.
#
#   scripts/device_check.sh               on the GPU machine: results under $OUT
#   scripts/device_check.sh --cpu-dry-run here: the same steps on the CPU (nothing installed)
#
# Installs the carried wheels (wheels/, made with `pip download --no-deps`: the machine fetches
# nothing) and this package (pip install --no-deps -e .), prints the host, runs
# tests/test_gpu_device.py -m gpu (one run of bench.gpu: every number printed, and written to
# $OUT/gpu.json), then the direct path's scaling curve over the host's cores (bench
# direct_scaling, about 3 minutes on 16 cores). Every step has a timeout; the whole stays under
# about 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}
DRY_RUN=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY_RUN=1
mkdir -p "$OUT"
started=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - started ))s)"; }

step "host"
{ uname -a; nproc; free -g; "$PYTHON" --version; } 2>&1 | tee "$OUT/host.txt"
if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
fi

if [ "$DRY_RUN" = 0 ]; then
    step "install"
    if compgen -G "wheels/*.whl" >/dev/null; then
        timeout 120 "$PYTHON" -m pip install --no-index --no-deps wheels/*.whl 2>&1 | tail -3
    fi
    timeout 120 "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2 \
        || echo "pip install -e . failed: running from the checkout (PYTHONPATH)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step "versions"
timeout 120 "$PYTHON" - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib
for name in ("torch", "grpc", "google.protobuf", "yaml", "numpy", "pynvml", "pytest", "prometheus_client"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:
        print(name, "MISSING", type(error).__name__, error)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
PY

step "gpu tests (one run of bench.gpu)"
OUT="$OUT" timeout 420 "$PYTHON" -m pytest tests/test_gpu_device.py -m gpu -s -rA -p no:cacheprovider \
    -o timeout=400 2>&1 | tee "$OUT/pytest.txt"
status=${PIPESTATUS[0]}

step "the direct path's scaling curve (issue 19: 1, 2, 4, 8, 14 workers, direct against daemon path)"
if [ "$DRY_RUN" = 0 ]; then
    timeout 300 "$PYTHON" -m bench --only direct_scaling 2>&1 | grep -v Warning | tee "$OUT/direct_scaling.txt"
    status=$(( status | PIPESTATUS[0] ))
    cp -r bench/results "$OUT/bench-results" 2>/dev/null || true
else
    echo "(dry run: skipped here; make bench-smoke runs it)" | tee "$OUT/direct_scaling.txt"
fi

if [ "$DRY_RUN" = 1 ]; then
    step "bench.gpu --cpu-dry-run"
    timeout 300 "$PYTHON" -m bench.gpu --cpu-dry-run --callers 4 --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/bench.txt"
    status=$(( status | PIPESTATUS[0] ))
fi
step "done: exit $status, results in $OUT"
ls -l "$OUT"
exit "$status"
