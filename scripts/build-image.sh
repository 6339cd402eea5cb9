#!/usr/bin/env bash
# Build vpnfleet's image with podman, without any container registry:
#   scripts/build-image.sh [TAG]             (default localhost/vpnfleet:VERSION)
# The base is a Debian rootfs made by debootstrap from the host's apt mirror and imported with
# `podman import` (cached: the rootfs tarball in $VPNFLEET_IMAGE_CACHE, the image in podman's
# storage), then deploy/Dockerfile is built on it with --pull=never. BASE=IMAGE uses an image
# already in local storage instead (e.g. ubuntu:24.04, the Dockerfile's default).
# Prints the image's size and the build time. Needs root (debootstrap, rootful podman).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(python3 -c 'import re,sys; print(re.search(r"__version__ = \"([^\"]+)\"", open("src/vpnfleet/__init__.py").read()).group(1))')
TAG=${1:-localhost/vpnfleet:$VERSION}
SUITE=${DEBIAN_SUITE:-bookworm}
CACHE=${VPNFLEET_IMAGE_CACHE:-/var/cache/vpnfleet-image}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/podman/containers.conf}

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "build-image: $tool is missing (scripts/bootstrap.sh installs it)" >&2; exit 1; }
done
[[ $(id -u) -eq 0 ]] || { echo "build-image: run as root (debootstrap, rootful podman)" >&2; exit 1; }

start=$(date +%s.%N)

# The first http(s) Debian mirror the host's apt uses (deb822 or one-line format).
mirror() {
  local m
  m=$(grep -hoE '^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
      | grep -v -- '-security' | head -n1 | grep -oE 'https?://[^[:space:]]+' || true)
  echo "${m:-http://deb.debian.org/debian}"
}

# A Debian base image made without a registry; reused from podman's storage or the cache.
debian_base() {
  local image=localhost/vpnfleet-base:debian-$SUITE
  if podman image exists "$image"; then
    echo "$image"
    return
  fi
  local tarball=$CACHE/debian-$SUITE-minbase.tar
  if [[ ! -s $tarball ]]; then
    local rootfs m
    m=$(mirror)
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    echo "build-image: debootstrap --variant=minbase $SUITE from $m" >&2
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$m" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -n 20 "$CACHE/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" --numeric-owner -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
  fi
  podman import --quiet "$tarball" "$image" >/dev/null
  echo "$image"
}

BASE_IMAGE=${BASE:-$(debian_base)}
base_done=$(date +%s.%N)

# Outbound HTTPS may be re-signed by a CA only the host trusts: let pip in the build use the
# host's bundle (the mounts leave two empty files in the image, nothing else).
mounts=()
if [[ -s /etc/ssl/certs/ca-certificates.crt ]]; then
  pipconf=$(mktemp)
  trap 'rm -f "$pipconf"' EXIT
  printf '[global]\ncert = /run/host-ca.crt\n' >"$pipconf"
  chmod 0644 "$pipconf"
  mounts=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro -v "$pipconf:/etc/pip.conf:ro")
fi

revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
podman build --pull=never --quiet \
  --build-arg BASE="$BASE_IMAGE" --build-arg VERSION="$VERSION" --build-arg REVISION="$revision" \
  "${mounts[@]}" -f deploy/Dockerfile -t "$TAG" . >/dev/null

end=$(date +%s.%N)
size=$(podman image inspect --format '{{.Size}}' "$TAG")
printf 'build-image: %s on %s: %d MB, base %.0f s, build %.0f s\n' "$TAG" "$BASE_IMAGE" \
  $((size / 1000000)) "$(awk "BEGIN{print $base_done - $start}")" "$(awk "BEGIN{print $end - $base_done}")"
echo "$TAG"
