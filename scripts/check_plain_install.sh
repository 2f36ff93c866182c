#!/usr/bin/env bash
# Installs deployd as a user (and deploy/Dockerfile) would: a fresh venv, torch (the CPU
# build pinned in constraints.txt), then `pip install .` with no extras, so nothing that
# only the dev extra brings (numpy, pytest, ...) is there. Then starts `deployd serve` from
# that venv and runs the README's quick-start example against it with the same venv.
# Proves that the runtime dependencies are complete; `make test` cannot, as it installs .[dev].
#   scripts/check_plain_install.sh          (make check-install)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d -t deployd-plain-install-XXXXXX)
DAEMON=
cleanup() {
    if [ -n "$DAEMON" ] && kill -0 "$DAEMON" 2>/dev/null; then kill -KILL "$DAEMON" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
started=$SECONDS

# The same files deploy/Dockerfile copies, so a file the install needs but the image lacks fails here too.
mkdir "$WORK/src" "$WORK/run"
cp -r constraints.txt pyproject.toml README.md server client deployd_wire deployd_cli deployd_worker "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +

"$PYTHON" -m venv "$WORK/venv"
BIN=$WORK/venv/bin
"$BIN/pip" install --quiet -c constraints.txt torch
"$BIN/pip" install --quiet -c constraints.txt "$WORK/src"
echo "check-install: installed in $((SECONDS - started))s: $("$BIN/pip" list --format=freeze 2>/dev/null | tr '\n' ' ')"

# The README's quick-start example, as written, on the daemon's port.
"$BIN/python" - "$REPO/README.md" "$WORK/run/example.py" <<'EOF'
import re, sys
readme = open(sys.argv[1]).read()
quick_start = readme[readme.index("## Quick start"):]
example = re.search(r"```python\n(.*?)```", quick_start, re.S).group(1)
assert '"127.0.0.1:50051"' in example, "the example no longer connects to 127.0.0.1:50051"
open(sys.argv[2], "w").write(example.replace('"127.0.0.1:50051"', "sys.argv[1]").replace("import torch", "import sys\nimport torch", 1))
EOF

cd "$WORK/run"  # not the repository: every import must come from the venv
"$BIN/deployd" serve --address 127.0.0.1:0 --workers 2 2>"$WORK/daemon.log" &
DAEMON=$!
port=
for _ in $(seq 1 1200); do  # up to 120 s
    port=$(sed -n 's/.*listening on [^ ]*:\([0-9]*\).*/\1/p' "$WORK/daemon.log" | head -n 1)
    [ -n "$port" ] && break
    kill -0 "$DAEMON" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$port" ]; then
    echo "check-install: the daemon did not start:" >&2
    cat "$WORK/daemon.log" >&2
    exit 1
fi

if ! timeout 300 "$BIN/python" example.py "127.0.0.1:$port" >"$WORK/example.out" 2>&1; then
    echo "check-install: the README example failed:" >&2
    cat "$WORK/example.out" "$WORK/daemon.log" >&2
    exit 1
fi
cat "$WORK/example.out"
grep -q "tensor(" "$WORK/example.out" || { echo "check-install: the example printed no tensor" >&2; exit 1; }

kill -TERM "$DAEMON"
for _ in $(seq 1 600); do kill -0 "$DAEMON" 2>/dev/null || break; sleep 0.1; done  # up to 60 s
kill -0 "$DAEMON" 2>/dev/null && { echo "check-install: the daemon did not stop" >&2; exit 1; }
code=0
wait "$DAEMON" || code=$?
DAEMON=
if [ "$code" != 0 ]; then
    echo "check-install: the daemon exited with $code:" >&2
    cat "$WORK/daemon.log" >&2
    exit 1
fi
echo "check-install: ok in $((SECONDS - started))s"
