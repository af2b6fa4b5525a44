#!/usr/bin/env bash
# Pin every Python package of the two images, with hashes, for CPython 3.11 on linux x86_64:
#   requirements-gpu.lock     pyproject.toml's core dependencies; torch from PyPI (its CUDA build)
#   requirements-worker.lock  core + the `kubernetes` extra; torch's CPU build (no CUDA libraries)
# Both pin torch to constraints-cpu.txt and take setuptools for building resflow itself.
# Run after changing pyproject.toml's dependencies (needs uv: `pip install uv`):
#   infra/docker/lock.sh
# TORCH_CPU_WHEELS: where the +cpu torch wheel is listed (a find-links page or folder).
set -euo pipefail
cd "$(dirname "$0")/../.."
TORCH_CPU_WHEELS="${TORCH_CPU_WHEELS:-https://download.pytorch.org/whl/cpu/torch/}"
build_requires="$(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')"
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header
        --constraint constraints-cpu.txt)

echo "$build_requires" | uv pip compile pyproject.toml - "${common[@]}" \
  --output-file infra/docker/requirements-gpu.lock
# constraints-cpu.txt says torch==X; the find-links page offers X+cpu, which satisfies it
echo "$build_requires" | uv pip compile pyproject.toml - "${common[@]}" --extra kubernetes \
  --find-links "$TORCH_CPU_WHEELS" --output-file infra/docker/requirements-worker.lock
grep -E '^(ray|torch)==' infra/docker/requirements-*.lock
