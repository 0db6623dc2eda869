#!/usr/bin/env bash
# Installs Podman for the container executor's tests (tests/integration/test_podman_*.py):
# podman with runc (crun fails on this kernel's hybrid cgroups), catatonit (the pause
# process every job container runs, daemon/executors/podman/executor.py), busybox-static for the
# example image, and the containers.conf they need. Idempotent; run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(podman runc catatonit busybox-static)
missing=()
for pkg in "${packages[@]}"; do
    [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" == "install ok installed" ]] \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The same file the test fixtures point CONTAINERS_CONF at, so a hand-run
# `podman` or `podman.socket` behaves like the tests.
install -D -m 0644 guest_modules/containers/containers.conf /etc/containers/containers.conf

podman --version
runc --version | sed -n 1p
catatonit --version
