#!/usr/bin/env bash
# Render every overlay into infra/k8s/rendered/ (committed, so a review shows what
# `kubectl apply -k` will create; tests/test_infra.py validates these files and, where a
# kustomize is installed, checks that they match a fresh render).
#   infra/k8s/render.sh
# Uses `kustomize build` if kustomize is on PATH, else `kubectl kustomize` (kubectl >= 1.27
# embeds kustomize v5).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if command -v kustomize >/dev/null; then
  build=(kustomize build)
  version="kustomize $(kustomize version 2>/dev/null | head -1)"
elif command -v kubectl >/dev/null; then
  build=(kubectl kustomize)
  version="kubectl kustomize, $(kubectl version --client 2>/dev/null | grep -i kustomize | head -1)"
else
  echo "render.sh: needs kustomize or kubectl on PATH" >&2
  exit 1
fi
mkdir -p "$here/rendered"
for overlay in prod dev; do
  for part in "" jobs; do
    name="$overlay${part:+-$part}"
    {
      echo "# Rendered by infra/k8s/render.sh from overlays/$overlay${part:+/$part} ($version). Do not edit."
      "${build[@]}" "$here/overlays/$overlay${part:+/$part}"
    } > "$here/rendered/$name.yaml"
    echo "rendered/$name.yaml"
  done
done
