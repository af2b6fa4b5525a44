#!/usr/bin/env bash
# Build the stand-in base images on a machine that cannot pull rayproject/ray or python:3.11-slim
# (no registry access) but reaches a Debian mirror: debootstrap a bookworm root file system,
# import it, and build the two bases of infra/podman/Containerfile.*. Runs as root (debootstrap).
#   infra/podman/build-bases.sh        # then infra/podman/build-images.sh
#   BUILD_FLAGS=--no-cache infra/podman/build-bases.sh   # rebuild the bases from scratch
# DEBIAN_MIRROR: the Debian mirror debootstrap fetches from.
set -euo pipefail
cd "$(dirname "$0")/../.."
source infra/podman/common.sh
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if ! podman image exists "$DEBIAN_IMAGE"; then
  rootfs="$(mktemp -d /var/tmp/resflow-bookworm.XXXXXX)"
  timed "debootstrap bookworm" debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR"
  tar -C "$rootfs" -c . | podman import - "$DEBIAN_IMAGE"
  rm -rf "$rootfs"
fi
build_mounts
timed "build $RAY_BASE_STANDIN" podman build ${BUILD_FLAGS:-} "${mounts[@]}" --build-arg "DEBIAN=$DEBIAN_IMAGE" \
  -f infra/podman/Containerfile.ray-base -t "$RAY_BASE_STANDIN" infra/podman
timed "build $PYTHON_BASE_STANDIN" podman build ${BUILD_FLAGS:-} "${mounts[@]}" --build-arg "DEBIAN=$DEBIAN_IMAGE" \
  -f infra/podman/Containerfile.python-base -t "$PYTHON_BASE_STANDIN" infra/podman
