#!/usr/bin/env bash
# Pin every Python package of the images, with hashes, for CPython 3.11 on linux x86_64:
#   requirements-gpu.lock     pyproject.toml's core dependencies; torch from PyPI (its CUDA build)
#   requirements-cpu.lock     the same versions as requirements-gpu.lock but torch's CPU build
#                             (the Ray image's CPU variant: CPU node groups, machines without CUDA)
#   requirements-worker.lock  core + the `kubernetes` extra; torch's CPU build (no CUDA libraries)
# Both pin torch to constraints-cpu.txt and take setuptools for building resflow itself.
# Run after changing pyproject.toml's dependencies (needs uv: `pip install uv`):
#   infra/docker/lock.sh
# TORCH_CPU_WHEELS: where the +cpu torch wheel is listed (a find-links page or folder). Where
# download.pytorch.org cannot be reached, a folder holding the same wheel works
# (TORCH_CPU_WHEELS=/opt/wheels): the lock pins the file's sha256, the same either way.
# LOCKS: which locks to write (default all three), e.g. LOCKS=cpu.
set -euo pipefail
cd "$(dirname "$0")/../.."
TORCH_CPU_WHEELS="${TORCH_CPU_WHEELS:-https://download.pytorch.org/whl/cpu/torch/}"
build_requires="$(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')"
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header
        --constraint constraints-cpu.txt)

LOCKS="${LOCKS:-gpu cpu worker}"

if [[ " $LOCKS " == *" gpu "* ]]; then
  echo "$build_requires" | uv pip compile pyproject.toml - "${common[@]}" \
    --output-file infra/docker/requirements-gpu.lock
fi
if [[ " $LOCKS " == *" cpu "* ]]; then
  # The GPU lock's versions as constraints: the two Ray images differ in torch's build only
  gpu_pins="$(mktemp)"
  trap 'rm -f "$gpu_pins"' EXIT
  grep -E '^[A-Za-z0-9_.-]+==' infra/docker/requirements-gpu.lock | sed 's/ .*//' \
    | grep -v '^torch==' > "$gpu_pins"
  # constraints-cpu.txt says torch==X; the find-links page offers X+cpu, which satisfies it
  echo "$build_requires" | uv pip compile pyproject.toml - "${common[@]}" --constraint "$gpu_pins" \
    --find-links "$TORCH_CPU_WHEELS" --output-file infra/docker/requirements-cpu.lock
  sed -i "s|-c $gpu_pins|-c infra/docker/requirements-gpu.lock|" infra/docker/requirements-cpu.lock
fi
if [[ " $LOCKS " == *" worker "* ]]; then
  echo "$build_requires" | uv pip compile pyproject.toml - "${common[@]}" --extra kubernetes \
    --find-links "$TORCH_CPU_WHEELS" --output-file infra/docker/requirements-worker.lock
fi
grep -E '^(ray|torch)==' infra/docker/requirements-*.lock
