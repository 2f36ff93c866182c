#!/usr/bin/env bash
# The image built and run for real (make image-test): deploy/Dockerfile built offline, the
# container started, the seed model loaded from its package volume and called from this host,
# then stopped as Docker stops it (SIGTERM through tini: drain, exit 0).
#
# Nothing is pulled: no registry is reachable, only Debian's mirror and the package indexes.
#   1. a Docker engine: the running one, else dockerd (installed with apt-get when missing)
#      started here and stopped at the end. Where none can be had: "image-test: skipped: why", exit 0.
#   2. the base image: Debian bookworm from debootstrap, with Python 3.11, pip and tini, made to
#      look like python:3.11-slim to the Dockerfile. Built once, kept (deployd-test-base:bookworm).
#   3. a wheelhouse (build/wheelhouse, ignored by git, sent in the build context): torch, deployd's
#      runtime dependencies and setuptools, downloaded here with pip.
#   4. docker build --network none with BASE_IMAGE and WHEELHOUSE: no step can reach anything.
#   5. docker run as a user would (token, --shm-size, ports on 127.0.0.1: the daemon's, metrics,
#      and the two workers' data ports on the numbers the image gives them), wait for health,
#      scripts/image_smoke.py (the daemon path, then straight to the workers' ports), docker stop,
#      exit code 0 and a clean shutdown in the log.
# The images are kept so that the next run's build is cached (seconds); the container is always
# removed. First run on a fresh machine: a few minutes (debootstrap, installing torch in the image).
#   scripts/image_test.sh          (make image-test, which makes .venv first)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=.venv/bin                          # the client side: deployd health, the smoke test
BASE_IMAGE=deployd-test-base:bookworm
IMAGE=deployd:test
WHEELHOUSE=build/wheelhouse            # relative: the Dockerfile copies it from the build context
SUITE=bookworm                         # Debian 12: its python3 is 3.11, as python:3.11-slim's
CONTAINER=deployd-image-test-$$
TOKEN=image-test-$$-$RANDOM$RANDOM     # the image binds 0.0.0.0, so it refuses to start without one
WORKERS=2                              # and as many data ports published
WORK=$(mktemp -d -t deployd-image-test-XXXXXX)
DOCKERD_PID=                           # set when this script started dockerd: it stops only that one
DOCKER=(docker)
started=$SECONDS

say() { echo "image-test: $*"; }
skip() {
    say "skipped: $*"
    exit 0
}
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}
dk() { "${DOCKER[@]}" "$@"; }
# A process of ours still running (not a zombie); works for root's processes under sudo too.
alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

# timed NAME COMMAND...: runs a step and prints how long it took.
timed() {
    local name=$1 step_started=$SECONDS
    shift
    "$@"
    say "$name: $((SECONDS - step_started))s"
}

cleanup() {
    local code=$?
    set +e
    if [ -n "$(dk ps -aq --filter "name=^/$CONTAINER\$" 2>/dev/null)" ]; then
        if [ "$code" != 0 ]; then
            say "the container's log:"
            dk logs --tail 200 "$CONTAINER" 2>&1 | sed 's/^/    /'
        fi
        dk rm -f "$CONTAINER" >/dev/null
    fi
    if [ -n "$DOCKERD_PID" ]; then
        [ "$code" != 0 ] && { say "dockerd's log (last lines):"; tail -n 30 "$WORK/dockerd.log" | sed 's/^/    /'; }
        as_root kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 1 300); do alive "$DOCKERD_PID" || break; sleep 0.1; done  # up to 30 s
        alive "$DOCKERD_PID" && say "dockerd (pid $DOCKERD_PID) is still stopping"
    fi
    rm -rf "$WORK"
    [ "$code" = 0 ] || say "FAILED after $((SECONDS - started))s"
}
trap cleanup EXIT
trap 'exit 130' INT  # through the EXIT trap: the container removed, our dockerd stopped
trap 'exit 143' TERM

# 1. A Docker engine: one already running (docker info answers), else dockerd started here.
engine() {
    if docker info >/dev/null 2>&1; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        sudo -n true 2>/dev/null || skip "no Docker engine answers, and no root (sudo -n) to start one"
        if sudo -n docker info >/dev/null 2>&1; then
            DOCKER=(sudo -n docker)
            return
        fi
        DOCKER=(sudo -n docker)
    fi
    if ! command -v dockerd >/dev/null 2>&1; then
        command -v apt-get >/dev/null 2>&1 || skip "no dockerd, and no apt-get to install docker.io"
        say "installing docker.io with apt-get"
        { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends docker.io; } >"$WORK/apt.log" 2>&1 \
            || { tail -n 20 "$WORK/apt.log"; skip "apt-get could not install docker.io"; }
        # Where an init system runs, the package starts its own service: use that one.
        if dk info >/dev/null 2>&1; then
            return
        fi
    fi
    command -v docker >/dev/null 2>&1 || skip "dockerd is installed but no docker client"
    # Its log goes to a file; it keeps its images (the cache) in its usual /var/lib/docker.
    # Started directly (not through a function, which would fork a shell in between), so that
    # $! is dockerd itself, or the sudo that passes our SIGTERM on to it.
    if [ "$(id -u)" = 0 ]; then
        dockerd >"$WORK/dockerd.log" 2>&1 &
    else
        # shellcheck disable=SC2024  # the log is ours to write: sudo only for dockerd
        sudo -n dockerd >"$WORK/dockerd.log" 2>&1 &
    fi
    DOCKERD_PID=$!
    for _ in $(seq 1 120); do  # up to 60 s
        dk info >/dev/null 2>&1 && { say "started dockerd (pid $DOCKERD_PID)"; return; }
        if ! alive "$DOCKERD_PID"; then
            DOCKERD_PID=
            tail -n 20 "$WORK/dockerd.log"
            skip "dockerd exited at start"
        fi
        sleep 0.5
    done
    tail -n 20 "$WORK/dockerd.log"
    skip "dockerd did not answer within 60 s"
}

# The Debian mirror this host's apt uses: the only one reachable where the network is closed.
debian_mirror() {
    local mirror
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -v '^[[:space:]]*#' | grep -oE 'https?://[^[:space:]]+/debian/?([[:space:]]|$)' | head -n 1 | tr -d '[:space:]' || true)
    echo "${mirror:-http://deb.debian.org/debian}"
}

# 2. The base image, once: what the Dockerfile needs of python:3.11-slim (python 3.11 and a pip
# that installs system-wide, useradd) plus tini, so the build needs no network at all.
base_image() {
    if [ -n "$(dk images -q "$BASE_IMAGE")" ]; then
        say "base image $BASE_IMAGE: cached"
        return
    fi
    command -v debootstrap >/dev/null 2>&1 || {
        say "installing debootstrap with apt-get"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap \
            >"$WORK/apt.log" 2>&1 || { as_root apt-get update -q >>"$WORK/apt.log" 2>&1 \
            && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap \
                >>"$WORK/apt.log" 2>&1; } || { tail -n 20 "$WORK/apt.log"; exit 1; }
    }
    local mirror rootfs=$WORK/rootfs keyring=()
    mirror=$(debian_mirror)
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] \
        && keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
    say "debootstrap $SUITE from $mirror"
    as_root timeout 900 debootstrap --variant=minbase "${keyring[@]}" \
        --include=python3,python3-pip,tini,ca-certificates "$SUITE" "$rootfs" "$mirror" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -n 30 "$WORK/debootstrap.log"; exit 1; }
    # Like python:3.11-slim: `python`, and pip allowed to install system-wide (Debian marks its
    # Python externally managed; the image has nothing else installed with pip or apt to protect).
    as_root ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    as_root rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
    as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    as_root tar -C "$rootfs" -c . | dk import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$BASE_IMAGE" >/dev/null
    as_root rm -rf "$rootfs"
}

# 3. The wheelhouse: what pip would fetch in the build, fetched here (the same Python, 3.11 on
# x86_64 Linux, so the same wheels fit). Files already there are kept; setuptools builds deployd.
wheelhouse() {
    mkdir -p "$WHEELHOUSE"
    "$BIN/pip" download --progress-bar off -c constraints.txt -d "$WHEELHOUSE" torch . 'setuptools>=68' \
        >"$WORK/pip.log" 2>&1 || { tail -n 30 "$WORK/pip.log"; exit 1; }
    say "wheelhouse: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
}

# 4. The image, with no network: every file comes from the base image and the build context.
image() {
    local before after
    before=$(dk images -q "$IMAGE")
    timeout 1200 "${DOCKER[@]}" build --network none \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg WHEELHOUSE="$WHEELHOUSE" \
        -f deploy/Dockerfile -t "$IMAGE" . >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 1; }
    after=$(dk images -q "$IMAGE")
    # The image this build replaced: removed, so reruns do not pile up images (its layers that
    # the new one shares stay, and with them the cache).
    if [ -n "$before" ] && [ "$before" != "$after" ]; then
        dk rmi "$before" >/dev/null 2>&1 || true
    fi
    say "image $IMAGE: $(dk image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')," \
        "$(grep -c ' ---> Using cache' "$WORK/build.log" || true) steps cached"
}

# The first of COUNT consecutive ports free on this host's loopback: FIRST's if those are free.
free_ports() {
    "$BIN/python" - "$1" "$2" <<'EOF'
import socket
import sys


def free(first: int, count: int) -> bool:
    for port in range(first, first + count):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


first, count = int(sys.argv[1]), int(sys.argv[2])
while not free(first, count):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        first = min(probe.getsockname()[1], 65536 - count)
print(first)
EOF
}

# 5. The container as a user runs it (README, deploy/Dockerfile's header): a token, shared
# memory, the ports on this host's loopback (port 0: any free one), the packages as a volume.
# The workers' data ports are published on the numbers the daemon advertises (the image's
# config: 127.0.0.1 and 50100 + slot), so they are the image's own unless taken on this host.
run() {
    mkdir -p "$WORK/packages"
    "$BIN/python" -W "ignore:TypedStorage is deprecated:UserWarning" scripts/export_seed.py "$WORK/packages/seed.pt"
    chmod 755 "$WORK/packages"  # the daemon runs as uid 10001 (the mount's parents do not matter)
    chmod 644 "$WORK/packages/seed.pt"
    local image_ports data_env=()
    image_ports=$("$BIN/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["pool"]["data_ports"])' \
        deploy/config.yaml)
    DATA_FIRST=$(free_ports "$image_ports" "$WORKERS")
    DATA_LAST=$((DATA_FIRST + WORKERS - 1))
    if [ "$DATA_FIRST" != "$image_ports" ]; then
        say "the image's data ports $image_ports-$((image_ports + WORKERS - 1)) are taken here: using $DATA_FIRST-$DATA_LAST"
        data_env=(-e DEPLOYD_POOL_DATA_PORTS="$DATA_FIRST")
    fi
    dk run -d --name "$CONTAINER" --shm-size 512m \
        -e DEPLOYD_AUTH_ADMIN_TOKENS="$TOKEN" -e DEPLOYD_POOL_WORKERS="$WORKERS" "${data_env[@]}" \
        -v "$WORK/packages:/var/lib/deployd/packages:ro" \
        -p 127.0.0.1::50051 -p 127.0.0.1::8000 -p 127.0.0.1::9464 \
        -p "127.0.0.1:$DATA_FIRST-$DATA_LAST:$DATA_FIRST-$DATA_LAST" \
        "$IMAGE" >/dev/null
    ADDRESS=$(dk port "$CONTAINER" 50051/tcp | head -n 1)
    METRICS=$(dk port "$CONTAINER" 9464/tcp | head -n 1)
    HTTP=$(dk port "$CONTAINER" 8000/tcp | head -n 1)
    say "container $CONTAINER: gRPC on $ADDRESS, HTTP on $HTTP, metrics on $METRICS, data ports on 127.0.0.1:$DATA_FIRST-$DATA_LAST"
}

# Up: `deployd health` from here says SERVING through the published port, then Docker's own
# HEALTHCHECK (the same command inside the image) says healthy.
wait_healthy() {
    local deadline=$((SECONDS + 180)) health
    until "$BIN/deployd" health --address "$ADDRESS" --timeout 5 >/dev/null 2>&1; do
        [ "$(dk inspect -f '{{.State.Running}}' "$CONTAINER")" = true ] || { say "the container exited"; exit 1; }
        [ $SECONDS -lt $deadline ] || { say "not SERVING within 180 s"; exit 1; }
        sleep 1
    done
    while health=$(dk inspect -f '{{.State.Health.Status}}' "$CONTAINER") && [ "$health" != healthy ]; do
        [ "$health" != unhealthy ] || { say "Docker's HEALTHCHECK says unhealthy"; exit 1; }
        [ $SECONDS -lt $deadline ] || { say "Docker's HEALTHCHECK still says $health"; exit 1; }
        sleep 1
    done
    say "SERVING, and Docker's HEALTHCHECK says healthy; runs as uid $(dk exec "$CONTAINER" id -u)"
}

smoke() {
    DEPLOYD_TOKEN=$TOKEN timeout 300 "$BIN/python" scripts/image_smoke.py --address "$ADDRESS" \
        --metrics-url "http://$METRICS/metrics" --http-url "http://$HTTP" --package "$WORK/packages/seed.pt" --server-path seed.pt \
        --data-ports "$DATA_FIRST-$DATA_LAST"
}

# docker stop sends SIGTERM to PID 1, tini, which passes it on: the daemon drains and exits 0
# well within the 30 s before Docker would SIGKILL it (exit 137).
stop() {
    dk stop -t 30 "$CONTAINER" >/dev/null
    local code log
    code=$(dk inspect -f '{{.State.ExitCode}}' "$CONTAINER")
    log=$(dk logs "$CONTAINER" 2>&1)
    [ "$code" = 0 ] || { say "the container exited with $code"; exit 1; }
    if ! grep -q "shutting down" <<<"$log" || ! grep -qE "(^|[^a-z_])stopped$" <<<"$log"; then
        say "no clean shutdown in the log"
        exit 1
    fi
    if grep -qE "Traceback|ERROR" <<<"$log"; then
        say "errors in the container's log"
        exit 1
    fi
    say "stopped: exit code 0; the log ends:"
    tail -n 4 <<<"$log" | sed 's/^/    /'
}

timed "engine" engine
timed "base image" base_image
timed "wheelhouse" wheelhouse
timed "docker build" image
timed "docker run" run
timed "healthy" wait_healthy
timed "smoke test" smoke
timed "docker stop" stop
say "ok in $((SECONDS - started))s"
