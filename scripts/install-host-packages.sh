#!/usr/bin/env bash
# Installs the Debian packages ferry needs, only those missing; quiet when nothing is.
# Runs as root, or through sudo for a normal user.
set -euo pipefail

# ovmf: UEFI firmware for imported UEFI guests (agent/qemu/firmware.py).
PACKAGES=(qemu-system-x86 qemu-system-common qemu-utils ovmf libxxhash-dev gcc make binutils iproute2)
# bench linux: its guest's workload is compiled static (libc.a comes with libc6-dev).
PACKAGES+=(libc6-dev)
# The tests: systemd-analyze verify of the unit, throwaway users for the control socket.
PACKAGES+=(systemd passwd)

# A python3 from Debian needs venv and headers as packages; another python3 (pyenv) brings its own.
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then PACKAGES+=(python3-venv); fi
if ! python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
    PACKAGES+=(python3-dev)
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "ferry setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
echo "ferry setup: installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# apt's chatter (debconf notes included) is shown only when it fails.
log=$(mktemp)
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
