#!/usr/bin/env bash
# Build resflow's images with podman from infra/docker's Dockerfiles, unchanged, on the stand-in
# bases of infra/podman/build-bases.sh (a machine that cannot pull rayproject/ray or python:3.11):
#   the Ray image's CPU variant   $RAY_CPU_IMAGE  (requirements-cpu.lock)
#   the Prefect worker image      $WORKER_IMAGE   (requirements-worker.lock)
#   a SeaweedFS image             $S3_IMAGE       (the local S3 server for make cluster-e2e only)
# The +cpu torch wheel comes from TORCH_CPU_WHEELS, a folder mounted into the build
# (default /opt/wheels, where this machine keeps it) or a find-links URL.
# PIP_CA_BUNDLE: see common.sh.
#   infra/podman/build-images.sh [ray|worker|s3 ...]     # default: all three
#   BUILD_FLAGS=--no-cache infra/podman/build-images.sh   # from scratch (the README's build times)
set -euo pipefail
cd "$(dirname "$0")/../.."
source infra/podman/common.sh
TORCH_CPU_WHEELS="${TORCH_CPU_WHEELS:-/opt/wheels}"
build_mounts "$TORCH_CPU_WHEELS"

for image in "${@:-ray worker s3}"; do
  for one in $image; do
    case "$one" in
      ray) timed "build $RAY_CPU_IMAGE" podman build ${BUILD_FLAGS:-} "${mounts[@]}" -f infra/docker/Dockerfile \
             --build-arg "BASE=$RAY_BASE_STANDIN" --build-arg LOCK=requirements-cpu.lock \
             --build-arg "TORCH_CPU_WHEELS=$TORCH_CPU_WHEELS" -t "$RAY_CPU_IMAGE" . ;;
      worker) timed "build $WORKER_IMAGE" podman build ${BUILD_FLAGS:-} "${mounts[@]}" -f infra/docker/Dockerfile.worker \
             --build-arg "BASE=$PYTHON_BASE_STANDIN" \
             --build-arg "TORCH_CPU_WHEELS=$TORCH_CPU_WHEELS" -t "$WORKER_IMAGE" . ;;
      s3) timed "build $S3_IMAGE" podman build ${BUILD_FLAGS:-} "${mounts[@]}" --build-arg "BASE=$PYTHON_BASE_STANDIN" \
             -f infra/podman/Containerfile.seaweedfs -t "$S3_IMAGE" infra/podman ;;
      *) echo "unknown image $one (ray, worker, s3)" >&2; exit 2 ;;
    esac
  done
done
