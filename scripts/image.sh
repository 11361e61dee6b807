#!/usr/bin/env bash
# The container image, built and run with podman (or docker where that is what is installed).
#
#   scripts/image.sh build   # the base from Debian's packages when no registry answers, then the Dockerfile
#   scripts/image.sh up      # TorchServe in the image on 127.0.0.1:18080/18081/18082, key file in logs/image/;
#                            # returns once it answers /ping with its new keys, and prints the inference key
#   scripts/image.sh down    # stop and remove it
#   scripts/image.sh compose-up / compose-down   # the image + Prometheus (docker-compose.host.yml)
#
# Machines like ours: no container registry, no bridge networking, no rlimits: the base image is made with
# mmdebstrap and `podman import`, the container uses the host's network (TorchServe binds 127.0.0.1 only,
# docker/config-host.properties), and containers.conf sets `default_ulimits = []`.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/cxr-serve:latest}
BASE=${BASE:-localhost/cxr-base:bookworm}
NAME=${CXR_IMAGE_CONTAINER:-cxr-serve-image}
RUN_DIR=$PWD/logs/image
START_TIMEOUT=${CXR_IMAGE_START_TIMEOUT:-180}  # seconds, as the Dockerfile's HEALTHCHECK --start-period
PY=.venv/bin/python; [ -x "$PY" ] || PY=${PYTHON:-python3}  # cxr.healthcheck needs only the standard library

engine() {
    if command -v podman >/dev/null; then
        CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf} podman --runtime runc --cgroup-manager=cgroupfs "$@"
    else
        docker "$@"
    fi
}

debian_image() {  # NAME PACKAGES: an image of Debian bookworm with PACKAGES, unless NAME exists already
    if engine image inspect "$1" >/dev/null 2>&1; then return; fi
    echo "building $1 from Debian's packages ($2, mmdebstrap)"
    local tar
    tar=$(mktemp --suffix=.tar)
    mmdebstrap --variant=minbase --include="$2" bookworm "$tar"
    engine import "$tar" "$1"
    rm -f "$tar"
}

build() {
    debian_image "$BASE" python3,python3-venv,ca-certificates
    # This machine's package mirrors and CA bundle, when it has them (pip.conf's find-links / extra-index-url).
    mounts=() args=()
    for dir in /opt/pypi /opt/pypi-more /opt/wheels; do
        [ -d "$dir" ] && mounts+=(-v "$dir:/mirror/$(basename "$dir"):ro")
    done
    [ -d /opt/pypi ] && args+=(--build-arg "PIP_EXTRA_INDEX_URL=file:///mirror/pypi/simple file:///mirror/pypi-more/simple")
    [ -d /opt/wheels ] && args+=(--build-arg PIP_FIND_LINKS=/mirror/wheels)
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        mounts+=(-v /etc/ssl/certs/ca-certificates.crt:/mirror/ca.crt:ro)
        args+=(--build-arg PIP_CERT=/mirror/ca.crt)
    fi
    # podman writes OCI images by default, which drop the Dockerfile's HEALTHCHECK: ask for the docker format.
    command -v podman >/dev/null && args+=(--format docker)
    engine build --network host "${mounts[@]}" "${args[@]}" --build-arg "BASE=$BASE" -t "$IMAGE" .
}

run_dir() {
    # The key folder belongs to the image's user (uid 10001) and nobody else. TorchServe writes new keys at each
    # start: the last run's must not be read as this one's.
    mkdir -p "$RUN_DIR/logs"
    rm -f "$RUN_DIR/key_file.json" 2>/dev/null || sudo rm -f "$RUN_DIR/key_file.json"
    chown -R 10001:10001 "$RUN_DIR" 2>/dev/null || sudo chown -R 10001:10001 "$RUN_DIR"
    chmod 700 "$RUN_DIR"
}

wait_healthy() {  # CONTAINER: until TorchServe answers /ping as Healthy with the keys it wrote; then print the key
    local deadline=$((SECONDS + START_TIMEOUT)) problem= key
    echo "waiting for $1 to answer 127.0.0.1:18080/ping (at most $START_TIMEOUT s)"
    until PYTHONPATH=$PWD "$PY" -m cxr.healthcheck --key-file "$RUN_DIR/key_file.json" --port 18080 >/dev/null 2>&1; do
        if [ "$(engine inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" != true ]; then problem="$1 is not running"
        elif ((SECONDS > deadline)); then problem="$1 is not healthy after $START_TIMEOUT s"
        fi
        if [ -n "$problem" ]; then
            echo "$problem; its last log lines (TorchServe's own logs: $RUN_DIR/logs/):" >&2
            engine logs --tail 30 "$1" >&2 || true
            return 1
        fi
        sleep 2
    done
    key=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["inference"]["key"])' "$RUN_DIR/key_file.json")
    echo "$1 ($IMAGE) serving on 127.0.0.1:18080 (inference), 18081 (management), 18082 (metrics)"
    echo "inference key: $key  (all keys: $RUN_DIR/key_file.json)"
}

compose() {
    if command -v podman >/dev/null; then
        # The project's pinned podman-compose (requirements.txt): Debian's 1.0.3 adds a bridge network to
        # host-network services and fails.
        [ -x .venv/bin/podman-compose ] && PODMAN_COMPOSE=${PODMAN_COMPOSE:-.venv/bin/podman-compose}
        CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf} "${PODMAN_COMPOSE:-podman-compose}" -f docker-compose.host.yml "$@"
    else
        docker compose -f docker-compose.host.yml "$@"
    fi
}

up() {
    down >/dev/null 2>&1 || true
    run_dir
    engine run -d --name "$NAME" --network host --read-only --tmpfs /tmp:size=2g \
        -v "$RUN_DIR:/home/model-server/run" -v "$RUN_DIR/logs:/home/model-server/logs" \
        -v "$PWD/docker/config-host.properties:/home/model-server/config.properties:ro" \
        --health-cmd "python -m cxr.healthcheck --key-file /home/model-server/run/key_file.json --port 18080" \
        --security-opt no-new-privileges --cap-drop ALL "$IMAGE" >/dev/null
    wait_healthy "$NAME"
}

down() {
    engine rm -f "$NAME" >/dev/null 2>&1 && echo "stopped $NAME" || echo "nothing to stop"
}

case "${1:-}" in
    build) build ;;
    up) up ;;
    down) down ;;
    compose-up)
        down >/dev/null 2>&1 || true
        compose down >/dev/null 2>&1 || true  # a running one would keep its old keys
        run_dir
        debian_image localhost/cxr-prometheus:bookworm prometheus,ca-certificates
        compose up -d
        wait_healthy "$(engine ps --filter label=com.docker.compose.service=torchserve --format '{{.Names}}')" ;;
    compose-down) compose down ;;
    *) echo "usage: $0 build | up | down | compose-up | compose-down" >&2; exit 2 ;;
esac
