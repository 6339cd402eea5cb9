#!/usr/bin/env bash
# Install what vpnfleet needs on a fresh Debian/Ubuntu machine (idempotent, run as root):
# the system packages (OpenVPN, iptables, ipset, conntrack, PostgreSQL, nginx, Prometheus,
# BIRD,
# podman and debootstrap for the image...)
# and the Python environment in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(openvpn iptables ipset conntrack iproute2 postgresql nginx-light prometheus iperf3 procps ulogd2 ulogd2-json slapd ldap-utils bird2)
# The image is built and run in tests/e2e/test_container.py (scripts/build-image.sh): podman
# with runc (crun refuses hybrid cgroups), netavark + aardvark-dns for container networks with
# name resolution, catatonit for the pause image of `podman kube play` pods, buildah, and
# debootstrap for a base image made without any registry.
PACKAGES+=(podman buildah runc netavark aardvark-dns catatonit debootstrap)
# The web console's browser tests (tests/e2e/test_console_browser.py): headless Chromium and its WebDriver.
PACKAGES+=(chromium chromium-driver)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: Python 3.11 or newer is required (found $("$PY" --version 2>&1))" >&2
  exit 1
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f $stamp ]]; then
  echo "bootstrap: creating the Python environment in .venv"
  [[ -x .venv/bin/python ]] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
