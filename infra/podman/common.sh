# Shared by infra/podman/*.sh (sourced): image names and the podman invocation this machine needs.
# crun refuses this machine's cgroup setup, so every podman call goes through runc
# (and /etc/containers/containers.conf holds `default_ulimits = []`, see infra/README.md).
podman() { command podman --runtime runc "$@"; }
DEBIAN_IMAGE="${DEBIAN_IMAGE:-localhost/debian:bookworm}"
RAY_BASE_STANDIN="${RAY_BASE_STANDIN:-localhost/resflow-base/ray:2.60.0-py311}"
PYTHON_BASE_STANDIN="${PYTHON_BASE_STANDIN:-localhost/resflow-base/python:3.11-slim-bookworm}"
RAY_CPU_IMAGE="${RAY_CPU_IMAGE:-localhost/resflow/resflow:0.1.0-cpu}"
WORKER_IMAGE="${WORKER_IMAGE:-localhost/resflow/resflow-worker:0.1.0}"
# timed LABEL CMD...: run CMD, then print how long it took (the README's build times come from here)
timed() {
  local label="$1" start=$SECONDS; shift
  "$@"
  echo "[timed] $label: $((SECONDS - start)) s"
}
S3_IMAGE="${S3_IMAGE:-localhost/resflow/seaweedfs:4.48}"

# build_mounts [FOLDER]: fill `mounts` with podman build volumes: FOLDER (the +cpu torch wheel)
# when it is one, and PIP_CA_BUNDLE, the CA bundle pip inside a build trusts (default: this
# machine's, which holds the certificate of the proxy in front of PyPI here), with a pip config
# naming it. Build volumes exist for the RUN steps only: nothing of them stays in the images.
build_mounts() {
  mounts=()
  if [[ -n "${1:-}" && -d "$1" ]]; then
    mounts+=(-v "$1:$1:ro")
  fi
  local bundle="${PIP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
  if [[ -f "$bundle" ]]; then
    pip_conf="$(mktemp)"
    trap 'rm -f "$pip_conf"' EXIT
    printf '[global]\ncert = /etc/resflow-build-ca.crt\n' > "$pip_conf"
    chmod 644 "$pip_conf"
    mounts+=(-v "$bundle:/etc/resflow-build-ca.crt:ro" -v "$pip_conf:/etc/pip.conf:ro")
  fi
}
