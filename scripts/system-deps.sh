#!/usr/bin/env bash
# System packages that `make serve` / `make test` need, installed with apt (through sudo when not root).
#
#   scripts/system-deps.sh python PYTHON   # PYTHON >= 3.11 with a working venv module (python3-venv)
#   scripts/system-deps.sh disk DIR        # room for the virtual environment in DIR (6.9 GB at the peak of its install)
#   scripts/system-deps.sh java            # Java >= 17 for TorchServe's frontend
#   scripts/system-deps.sh compiler        # g++ for the AOTInductor export
#   scripts/system-deps.sh containers      # podman + runc + mmdebstrap for `make image` (when no engine)
#   scripts/system-deps.sh browser         # Debian's chromium + chromium-driver for the demo page's test (optional)
#   scripts/system-deps.sh pacs            # Debian's Orthanc, the PACS the DICOM node's tests talk to (never shipped)
#
# Each step does nothing when what it needs is already there, and says what to do when it cannot install.
set -euo pipefail

sudo_prefix() {
    if [ "$(id -u)" = 0 ]; then echo ""; elif command -v sudo >/dev/null; then echo "sudo"; else return 1; fi
}

apt_install() {
    local sudo
    if ! command -v apt-get >/dev/null; then
        echo "no apt-get here: install $* yourself (see README, Prerequisites)" >&2; return 1
    fi
    if ! sudo=$(sudo_prefix); then
        echo "not root and no sudo: install $* yourself (see README, Prerequisites)" >&2; return 1
    fi
    echo "installing $* (apt-get${sudo:+ via sudo})"
    $sudo dpkg --configure -a || true  # finish an install that was interrupted, or apt refuses to run
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

java_major() {  # 17 for 'openjdk version "17.0.15"', 1 for '"1.8.0_402"', nothing when there is no java
    "${1:-java}" -version 2>&1 | sed -n 's/.* version "\([0-9]*\).*/\1/p' | head -n 1
}

case "${1:-}" in
python)
    python=${2:-python3}
    command -v "$python" >/dev/null || { echo "$python not found: install Python >= 3.11 or pass PYTHON=..." >&2; exit 1; }
    "$python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' 2>/dev/null || {
        echo "$python is $("$python" --version 2>&1); this project needs Python >= 3.11 (PYTHON=python3.11 make ...)" >&2
        exit 1; }
    if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
        minor=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        apt_install "python${minor}-venv" || apt_install python3-venv
    fi
    ;;
disk)
    # Measured: a fresh `pip install --no-cache-dir --require-hashes -r requirements.lock` peaks at 6.9 GB used
    # (GiB, as du -h counts; 6.6 GB stay). Say so before pip starts, rather than "No space left on device" halfway through.
    dir=${2:-.venv}; probe=$dir
    while [ ! -e "$probe" ]; do probe=$(dirname "$probe"); done
    need_kb=$((7 * 1024 * 1024)); used_kb=$(du -sk "$dir" 2>/dev/null | cut -f1 || echo 0)
    free_kb=$(df -Pk "$probe" | awk 'NR == 2 {print $4}')
    if [ $((free_kb + ${used_kb:-0})) -lt "$need_kb" ]; then
        echo "the virtual environment needs about 7 GB of disk (torch's CUDA wheels); $((free_kb / 1024)) MB free" \
            "under $probe: free some space first" >&2
        exit 1
    fi
    ;;
java)
    major=$(java_major || true)
    if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then major=$(java_major "$JAVA_HOME/bin/java" || true); fi
    if [ "${major:-0}" -ge 17 ] 2>/dev/null; then exit 0; fi
    for candidate in "${JVM_DIR:-/usr/lib/jvm}"/*/bin/java; do  # an older java first on the PATH, a newer one installed
        if [ -x "$candidate" ] && [ "$(java_major "$candidate")" -ge 17 ] 2>/dev/null; then exit 0; fi
    done
    echo "TorchServe needs Java >= 17 (found: ${major:-none})"
    apt_install openjdk-17-jre-headless
    ;;
containers)
    # `make image`: podman (with runc) where neither podman nor docker is installed, and mmdebstrap for a base
    # image made from Debian's packages where no container registry answers.
    if { command -v podman >/dev/null || command -v docker >/dev/null; } && command -v mmdebstrap >/dev/null; then exit 0; fi
    apt_install podman runc uidmap mmdebstrap
    ;;
compiler)
    # AOTInductor compiles the exported model to C++ at export time (`python -m export --formats aoti`).
    if command -v g++ >/dev/null; then exit 0; fi
    echo "the AOTInductor export needs a C++ compiler (g++)"
    apt_install g++
    ;;
browser)
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi
    apt_install chromium chromium-driver || echo "could not install chromium: the browser test will skip"
    ;;
pacs)
    # A real PACS for the DICOM node's end-to-end tests (tests/orthanc_support.py starts it on free loopback ports).
    # Orthanc is AGPL: used by the tests on this machine, never part of what we ship.
    if command -v Orthanc >/dev/null; then exit 0; fi
    apt_install orthanc || echo "could not install orthanc: the PACS tests will skip"
    ;;
*)
    echo "usage: $0 python PYTHON | disk DIR | java | compiler | containers | browser | pacs" >&2; exit 2
    ;;
esac
