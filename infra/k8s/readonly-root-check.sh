#!/usr/bin/env bash
# Runs what the manifests' read-only root filesystems must allow, on this machine: a Ray head
# started as KubeRay starts it (token auth on, an explicit object store), a job submitted
# through the Jobs API as a RayJob submitter does it (then refused with a wrong token), a task
# writing a temp file and a Ray Data pipeline, all with the root filesystem read-only and only
# /tmp and /dev/shm writable, as in the pods (emptyDirs). Everything runs in private user,
# mount, network and PID namespaces, so it touches no other Ray on the machine and leaves
# nothing running.
#   infra/k8s/readonly-root-check.sh            # about a minute; needs unshare (util-linux)
# Uses the python on PATH (or $PYTHON) with ray installed.
set -euo pipefail
python="${PYTHON:-$(command -v python)}"
bin="$(dirname "$python")"
exec unshare --user --map-root-user --mount --net --pid --fork --mount-proc bash -s "$python" "$bin" <<'SANDBOX'
set -euo pipefail
python="$1"; export PATH="$2:$PATH"
ip link set lo up
for target in $(findmnt -rn -o TARGET | sort -r); do
  case "$target" in /proc*|/sys*|/dev|/dev/pts|/dev/shm) continue;; esac
  mount -o remount,bind,ro "$target" 2>/dev/null || true
done
mount -t tmpfs -o size=2g tmpfs /tmp   # the pods' `tmp` emptyDir (and `ray-logs` below it)
if touch "$HOME/.readonly-root-check" 2>/dev/null; then echo "FAIL: the root filesystem is writable"; exit 1; fi
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
ray start --head --num-cpus=2 --object-store-memory=200000000 --dashboard-host=127.0.0.1 >/tmp/ray-start.log 2>&1 \
  || { tail -20 /tmp/ray-start.log; echo "FAIL: ray start"; exit 1; }
submitted="$(ray job submit --address http://127.0.0.1:8265 --submission-id readonly-check -- \
  python -c "print('job ran')" 2>&1)" || { echo "$submitted" | tail -20; echo "FAIL: ray job submit"; exit 1; }
grep -q "job ran" <<<"$submitted" || { echo "$submitted" | tail -20; echo "FAIL: the job's output is missing"; exit 1; }
if RAY_AUTH_TOKEN=wrong ray job status --address http://127.0.0.1:8265 readonly-check >/dev/null 2>&1; then
  echo "FAIL: a wrong token was accepted"; exit 1
fi
"$python" - <<'PY'
import pathlib, tempfile
import ray, ray.data
ray.init(address="auto")
@ray.remote(num_cpus=0.5)
def checkpoint(x):
    with tempfile.TemporaryDirectory(prefix="resflow-ckpt-") as directory:  # as Ray Train's rank 0 does
        (pathlib.Path(directory) / "model.safetensors").write_bytes(b"x" * 1000)
    return x
assert ray.get([checkpoint.remote(i) for i in range(4)]) == [0, 1, 2, 3]
assert ray.data.range(1000).map_batches(lambda b: {"id": b["id"] * 2}, num_cpus=0.5).sum("id") == 999000
PY
echo "OK: Ray head, Jobs API with token auth, tasks, temp files and Ray Data under a read-only root"
SANDBOX
