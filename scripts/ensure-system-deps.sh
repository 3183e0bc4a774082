#!/usr/bin/env bash
# Installs the Debian packages vmpower needs to build and test, only when one is
# missing, and runs `apt-get update` at most once (and only then).
set -euo pipefail

packages=(libvirt-dev pkg-config gcc "$@")
missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
# libvirt-python compiles against the interpreter's headers; a Debian python3 needs
# python3-dev and python3-venv for that (a pyenv/self-built Python ships both).
if ! python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h")))'; then
    missing+=(python3-dev)
fi
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "vmpower: missing system packages: ${missing[*]}; run as root or install them" >&2
    exit 1
fi
echo "vmpower: installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
