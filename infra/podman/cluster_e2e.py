"""`make cluster-e2e`: resflow's cluster path, run for real in containers on one machine.

    make cluster-e2e                                  # builds the images first (cached after the first time)
    python infra/podman/cluster_e2e.py [--keep]       # the images already built (infra/podman/build-images.sh)

On a podman network it creates (and removes, on success or failure): SeaweedFS (the S3
endpoint), a Prefect server, a Ray head and two Ray workers from the Ray image's CPU variant,
with token auth on (`RAY_AUTH_MODE=token`, the token a mounted file as KubeRay's Secret
provides it), and a Prefect worker from the worker image on a `process` work pool. From
inside the worker image `resflow deploy` registers the deployments; one nightly run trains
the `tiny` preset, challenges, promotes and restores a small dataset, every step a Ray job
submitted with the token. Then three drills, each proving its fault struck before judging:

  1. the Jobs API without the token is refused (401/403), with it answers;
  2. a Ray worker container killed (`podman kill`) mid-restore, some rows written and not
     all: the run still completes with every input row exactly once;
  3. a second run of the nightly deployment restores nothing new.

It prints what ran where, each run's final state, the rows restored and the timings.
Data is staged from this machine through the S3 port published on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
RAY_IMAGE = os.environ.get("RAY_CPU_IMAGE", "localhost/resflow/resflow:0.1.0-cpu")
WORKER_IMAGE = os.environ.get("WORKER_IMAGE", "localhost/resflow/resflow-worker:0.1.0")
S3_IMAGE = os.environ.get("S3_IMAGE", "localhost/resflow/seaweedfs:4.48")
POOL = "resflow-e2e"  # a process work pool: no Kubernetes here (infra/k8s deploys the Kubernetes one)
TOKEN_DIR_IN_CONTAINER = "/var/run/secrets/ray"  # where KubeRay mounts the token Secret
BUCKET = "resflow"
# Small Ray nodes for a 2-core machine: whole-CPU actors on it starve the reads and writes.
WORKER_CPUS = 2
OBJECT_STORE_BYTES = 400 * 1024 * 1024
SHM_SIZE = "600m"  # holds the object store (Ray puts it in /dev/shm)
STARTUP_S = 600  # how long a service may take to answer


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def podman(*args: str, check: bool = True, capture: bool = True, env: dict | None = None) -> str:
    # crun refuses this machine's cgroup setup: runc (infra/README.md, "Images built here")
    result = subprocess.run(["podman", "--runtime", "runc", *args], text=True,
                            env={**os.environ, **env} if env else None,
                            stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... failed ({result.returncode}): {result.stderr.strip()}")
    return (result.stdout or "").strip()


def wait_for(check, timeout: float, what: str, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = check()
            if value:
                return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Cluster:
    """Everything this run created, so that cleanup removes exactly that."""
    name: str
    secrets_dir: Path
    containers: list[str] = field(default_factory=list)
    network: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    s3_keys: tuple[str, str] = ("", "")
    token: str = ""

    def container(self, role: str) -> str:
        return f"{self.name}-{role}"

    def s3_env(self, endpoint: str) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": self.s3_keys[0],
                "AWS_SECRET_ACCESS_KEY": self.s3_keys[1], "AWS_REGION": "us-east-1"}

    def run(self, role: str, image: str, *command: str, env: dict | None = None, publish: tuple[int, ...] = (),
            extra: tuple[str, ...] = ()) -> None:
        name = self.container(role)
        args = ["run", "-d", "--name", name, "--hostname", name, "--network", self.network, *extra]
        for port in publish:  # loopback only, a port the kernel picks
            args += ["-p", f"127.0.0.1::{port}"]
        for key in env or {}:  # the value from podman's environment: keys never on a command line (ps)
            args += ["-e", key]
        args += [image, *command]
        self.containers.append(name)
        podman(*args, env=env)
        for port in publish:
            self.ports[f"{role}:{port}"] = int(podman("port", name, f"{port}/tcp").rsplit(":", 1)[1])

    def logs(self, role: str, tail: int = 40) -> str:
        # the container's stdout and stderr together (Prefect and Ray log to stderr)
        return subprocess.run(["podman", "logs", "--tail", str(tail), self.container(role)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout

    def cleanup(self) -> None:
        for name in reversed(self.containers):
            podman("rm", "-f", "-t", "5", name, check=False)
        if self.network:
            podman("network", "rm", "-f", self.network, check=False)
        shutil.rmtree(self.secrets_dir, ignore_errors=True)


def ray_env(cluster: Cluster) -> dict[str, str]:
    """Token auth on every node and client, the token from a mounted file (KubeRay's Secret)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": f"{TOKEN_DIR_IN_CONTAINER}/auth_token"}


def token_mount(cluster: Cluster) -> tuple[str, ...]:
    return ("-v", f"{cluster.secrets_dir / 'ray'}:{TOKEN_DIR_IN_CONTAINER}:ro")


def start_cluster(cluster: Cluster) -> None:
    cluster.network = cluster.name
    podman("network", "create", cluster.network)
    s3_internal = f"http://{cluster.container('s3')}:8333"

    # SeaweedFS with an identity file: pyarrow's multipart uploads fail without credentials
    access_key, secret_key = "resflow" + secrets.token_hex(6), secrets.token_urlsafe(24)
    cluster.s3_keys = (access_key, secret_key)
    identities = cluster.secrets_dir / "s3" / "identities.json"
    identities.parent.mkdir()
    identities.write_text(json.dumps({"identities": [{"name": "resflow", "credentials": [
        {"accessKey": access_key, "secretKey": secret_key}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    identities.chmod(0o644)
    cluster.run("s3", S3_IMAGE, "server", "-dir=/tmp", f"-ip={cluster.container('s3')}", "-ip.bind=0.0.0.0",
                "-s3", "-s3.port=8333", "-s3.config=/etc/seaweedfs/identities.json", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-volume.max=0", "-master.volumeSizeLimitMB=1024", publish=(8333,),
                extra=("-v", f"{identities.parent}:/etc/seaweedfs:ro"))

    cluster.run("prefect", WORKER_IMAGE, "prefect", "server", "start", "--host", "0.0.0.0", "--port", "4200",
                env={"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": "/tmp/prefect",
                     "PREFECT_UI_STATIC_DIRECTORY": "/tmp/prefect-ui"}, publish=(4200,))

    # The Ray token: a file in a folder mounted read-only, as KubeRay's Secret is
    token_file = cluster.secrets_dir / "ray" / "auth_token"
    token_file.parent.mkdir()
    cluster.token = secrets.token_hex(32)
    token_file.write_text(cluster.token)
    token_file.chmod(0o644)  # read by uid 1000 inside the containers
    node_env = {**ray_env(cluster), **cluster.s3_env(s3_internal)}  # S3 keys: the nodes' own environment
    node = ("--shm-size", SHM_SIZE, *token_mount(cluster))
    cluster.run("ray-head", RAY_IMAGE, "ray", "start", "--head", "--block", "--port=6379", "--num-cpus=0",
                "--dashboard-host=0.0.0.0", "--include-dashboard=true", "--disable-usage-stats",
                f"--object-store-memory={OBJECT_STORE_BYTES}", env=node_env, publish=(8265,), extra=node)
    for index in (1, 2):
        start_ray_worker(cluster, index, node_env, node)

    s3_url = f"http://127.0.0.1:{cluster.ports['s3:8333']}"
    # Generous: on a busy 2-core machine each takes minutes instead of seconds (4-15 s idle)
    wait_for(lambda: http_status(s3_url + "/") in (200, 403), STARTUP_S, "SeaweedFS's S3 endpoint")
    wait_for(lambda: http_status(prefect_url(cluster) + "/health") == 200, STARTUP_S, "the Prefect server")
    wait_for(lambda: alive_nodes(cluster) == 3, STARTUP_S, "the Ray head and two workers")


def start_ray_worker(cluster: Cluster, index: int, env: dict, extra: tuple[str, ...]) -> None:
    cluster.run(f"ray-worker-{index}", RAY_IMAGE, "ray", "start", "--block",
                f"--address={cluster.container('ray-head')}:6379", f"--num-cpus={WORKER_CPUS}",
                "--disable-usage-stats", f"--object-store-memory={OBJECT_STORE_BYTES}", env=env, extra=extra)


def prefect_url(cluster: Cluster) -> str:
    return f"http://127.0.0.1:{cluster.ports['prefect:4200']}/api"


def dashboard_url(cluster: Cluster) -> str:
    return f"http://127.0.0.1:{cluster.ports['ray-head:8265']}"


def http_status(url: str, headers: dict | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def node_summary(cluster: Cluster) -> list[dict]:
    """The dashboard's node list, asked with the token."""
    request = urllib.request.Request(dashboard_url(cluster) + "/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return [node["raylet"] for node in json.load(response)["data"]["summary"]]


def alive_nodes(cluster: Cluster) -> int:
    return sum(1 for node in node_summary(cluster) if node["state"] == "ALIVE")


def node_names(cluster: Cluster) -> dict[str, str]:
    """Ray node id -> the container it runs in (its hostname; a replaced node keeps the name)."""
    return {node["nodeId"]: node["nodeManagerHostname"].removeprefix(cluster.name + "-")
            for node in node_summary(cluster)}


# --- Prefect: deploy from inside the worker image, run, wait ------------------------------------


def start_prefect_worker(cluster: Cluster) -> None:
    """The worker container: a process pool's worker, with what a flow run needs to reach
    the Ray Jobs API (the token) and storage."""
    env = {"PREFECT_API_URL": f"http://{cluster.container('prefect')}:4200/api",
           "RAY_ADDRESS": f"http://{cluster.container('ray-head')}:8265", **ray_env(cluster),
           **cluster.s3_env(f"http://{cluster.container('s3')}:8333")}
    cluster.run("prefect-worker", WORKER_IMAGE, "prefect", "worker", "start", "--pool", POOL, "--type", "process",
                env=env, extra=token_mount(cluster))


def deploy(cluster: Cluster, params: dict) -> dict:
    pairs = [arg for key, value in params.items() for arg in ("--param", f"{key}={json.dumps(value) if not isinstance(value, str) else value}")]
    out = podman("exec", cluster.container("prefect-worker"), "resflow", "deploy", "--work-pool", POOL,
                 "--source", "/app", *pairs, "--json")
    return json.loads(out.splitlines()[-1])


def start_run(deployment: str, parameters: dict | None = None) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
        run = client.create_flow_run_from_deployment(found.id, parameters=parameters or {})
    return str(run.id)


def run_state(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def wait_run(flow_run_id: str, timeout: float) -> str:
    state = wait_for(lambda: (lambda s: s if s and s.is_final() else None)(run_state(flow_run_id)), timeout,
                     f"flow run {flow_run_id}", poll_s=3)
    return state.name


def run_and_subflow_ids(flow_run_id: str) -> list[str]:
    """The run and its subflow runs (train, challenge, restore), which submit the Ray jobs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    found, todo = [], [flow_run_id]
    with get_client(sync_client=True) as client:
        while todo:
            parent = todo.pop()
            found.append(parent)
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
            todo += [str(child.id) for child in children]
    return found


def ray_jobs(cluster: Cluster, flow_run_id: str) -> list:
    """The Ray jobs a flow run and its subflows submitted (raybridge's ids name the run)."""
    from ray.job_submission import JobSubmissionClient

    runs = run_and_subflow_ids(flow_run_id)
    jobs = JobSubmissionClient(dashboard_url(cluster)).list_jobs()
    return sorted([job for job in jobs if any(f"-{run}-" in (job.submission_id or "") for run in runs)],
                  key=lambda job: job.start_time or 0)


WORK_ACTORS = ("RayTrainWorker", "UnitRestorer")  # where the work ran; Ray's own actors stay out of the report


def actors_by_node(cluster: Cluster, job, names: dict[str, str]) -> dict[str, int]:
    """Where a job's training workers and restore replicas ran: {"container: class": count}."""
    from ray.util.state import list_actors

    counts: dict[str, int] = {}
    if job.job_id is None:  # the driver never connected to Ray (a step small enough to run in it)
        return counts
    for actor in list_actors(address=dashboard_url(cluster), filters=[("job_id", "=", job.job_id)], limit=1000,
                             raise_on_missing_output=False):
        name = next((work for work in WORK_ACTORS if work in actor.class_name), None)
        if name:
            node = names.get(actor.node_id) or (f"lost node {actor.node_id[:8]}" if actor.node_id else "never placed")
            key = f"{node}: {name}"
            counts[key] = counts.get(key, 0) + 1
    return counts


# --- data ---------------------------------------------------------------------------------------


def stage_data(root: str) -> None:
    """Small Train400 split for training (tiny preset), Set12 with sigma-25 noise as tonight's input."""
    from pipeline.degrade import Degradation, degrade_dataset
    from pipeline.ingest import ingest, split_dataset

    ingest(str(DATA / "Train400") + "/test_0[0-5][0-9].png", f"{root}/train400/all", rows_per_file=20, progress=False)
    split_dataset(f"{root}/train400/all", f"{root}/train400/train", f"{root}/train400/val", val_fraction=0.1)
    ingest(str(DATA / "Set12"), f"{root}/set12/clean", rows_per_file=6, progress=False)
    degrade_dataset(f"{root}/set12/clean", f"{root}/incoming", Degradation(noise_sigma=25), progress=False)


def stage_heavy(root: str) -> None:
    """Many small files and an untrained DnCNN-S (17 x 64): tens of seconds of restore on
    2 cores, long enough to kill a node in the middle (tests/test_cluster.py's drill)."""
    from pipeline.ingest import ingest
    from pipeline.modelio import save_model
    from pipeline.models import build_model

    ingest(str(DATA / "Train400") + "/test_1[0-9][0-9].png", f"{root}/heavy/input", rows_per_file=5, progress=False)
    save_model(f"{root}/heavy/model", build_model("dncnn", depth=17, width=64), version="dncnn-s-untrained")


def ids_by_file(uri: str) -> dict[str, list[str]]:
    from pipeline import storage
    from pipeline.dataset import read_table

    return {storage.relative_path(uri, info.uri): read_table(info.uri, columns=["image_id"])["image_id"].to_pylist()
            for info in storage.list_files(uri)}


def check_rows(input_uri: str, output_uri: str) -> tuple[int, dict]:
    """Every input row exactly once in the output, in the same file, all `ok`."""
    from pipeline import storage
    from pipeline.dataset import read_table

    expected = ids_by_file(input_uri)
    statuses: dict[str, int] = {}
    for relative, ids in expected.items():
        table = read_table(storage.join(output_uri, relative), columns=["image_id", "status"])
        assert table["image_id"].to_pylist() == ids, f"{relative}: rows differ from the input's"
        for status in table["status"].to_pylist():
            statuses[status] = statuses.get(status, 0) + 1
    outputs = ids_by_file(output_uri)
    assert set(outputs) == set(expected), f"output files {sorted(set(outputs) ^ set(expected))} differ from the input's"
    return sum(map(len, expected.values())), statuses


def manifest_progress(output_uri: str) -> tuple[int, int]:
    """(files, rows) the restore has published so far, from its manifest."""
    from pipeline.manifest import Manifest

    done = Manifest(output_uri, "manifest").all()
    return len(done), sum(entry.get("rows", 0) for entry in done.values())


# --- the run ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the cluster running (remove it by hand)")
    args = parser.parse_args()
    for image in (RAY_IMAGE, WORKER_IMAGE, S3_IMAGE):
        if subprocess.run(["podman", "image", "exists", image]).returncode != 0:
            print(f"image {image} is missing: run infra/podman/build-bases.sh and infra/podman/build-images.sh "
                  f"(or `make images`)", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleanup runs on SIGTERM too
    sys.path.insert(0, str(REPO))  # this checkout's pipeline/ stages and checks the data
    started = time.monotonic()
    cluster = Cluster(name=f"resflow-e2e-{os.getpid()}", secrets_dir=Path(tempfile.mkdtemp(prefix="resflow-e2e-")))
    timings: dict[str, float] = {}
    try:
        return run(cluster, timings)
    except BaseException:
        for role in ("s3", "prefect", "ray-head", "ray-worker-1", "ray-worker-2", "prefect-worker"):
            if cluster.container(role) in cluster.containers:
                print(f"--- last lines of {role}:\n{cluster.logs(role)}", file=sys.stderr)
        raise
    finally:
        if args.keep:
            log(f"kept: containers {cluster.containers}, network {cluster.network}")
        else:
            cluster.cleanup()
            log(f"removed {len(cluster.containers)} containers and network {cluster.network}")
        for key, seconds in {**timings, "total": time.monotonic() - started}.items():
            print(f"  {key:<52} {seconds:6.1f} s")


def timed(timings: dict, key: str):
    @contextlib.contextmanager
    def block():
        start = time.monotonic()
        yield
        timings[key] = time.monotonic() - start
    return block()


def run(cluster: Cluster, timings: dict) -> int:
    with timed(timings, "cluster up (S3, Prefect, Ray head + 2 workers)"):
        start_cluster(cluster)
    log(f"cluster up on network {cluster.network}: Ray dashboard {dashboard_url(cluster)}, "
        f"Prefect {prefect_url(cluster)}, S3 127.0.0.1:{cluster.ports['s3:8333']}")
    os.environ.update(cluster.s3_env(f"http://127.0.0.1:{cluster.ports['s3:8333']}"))
    os.environ.update({"PREFECT_API_URL": prefect_url(cluster), "RAY_AUTH_MODE": "token",
                       "RAY_AUTH_TOKEN": cluster.token})
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)

    # Drill 1: the Jobs API refuses a call without the token
    jobs_api = dashboard_url(cluster) + "/api/jobs/"
    without, with_token = http_status(jobs_api), http_status(jobs_api, {"Authorization": f"Bearer {cluster.token}"})
    assert with_token == 200, f"the Jobs API with the token answered {with_token}"
    assert without in (401, 403), f"the Jobs API without the token answered {without}, not 401/403"
    log(f"drill 1 passed: GET /api/jobs/ without the token -> {without}, with it -> {with_token}")

    import s3fs

    s3fs.S3FileSystem().mkdir(BUCKET)
    root = f"s3://{BUCKET}/e2e"
    with timed(timings, "stage data (Train400 subset, Set12 noisy)"):
        stage_data(root)
    start_prefect_worker(cluster)
    params = {"input": f"{root}/incoming", "output": f"{root}/restored", "registry": f"{root}/models",
              "train_data": f"{root}/train400/train", "val_data": f"{root}/train400/val",
              "train_preset": "tiny", "train_minutes": 2.0, "workers": 2, "previews": 2}
    with timed(timings, "resflow deploy (inside the worker image)"):
        deployed = deploy(cluster, params)
    log(f"resflow deploy (in {cluster.container('prefect-worker')}): {sorted(deployed['deployments'])} "
        f"on work pool {deployed['work_pool']}")

    # The nightly run: no champion yet -> train tiny, challenge, promote; restore Set12
    with timed(timings, "nightly run 1 (train, challenge, promote, restore)"):
        first = start_run("resflow-nightly/resflow-nightly")
        state = wait_run(first, 1800)
    report_jobs(cluster, first, "nightly run 1")
    assert state == "Completed", f"nightly run 1 ended {state}\n{cluster.logs('prefect-worker', 80)}"
    record = read_record(params["output"], first)
    rows, statuses = check_rows(params["input"], params["output"])
    log(f"nightly run 1: {state}; champion {record['champion']} ({record['bootstrap']['reason']}); "
        f"restored {rows} rows {statuses} in {len(record['new_files'])} file(s) of {params['output']}")
    steps = [job.metadata.get("resflow_step") for job in ray_jobs(cluster, first)]
    assert "train" in steps and "evaluate" in steps and "restore" in steps, steps
    assert statuses == {"ok": rows}

    # Drill 3: a second run of the deployment restores nothing new
    before = manifest_progress(params["output"])
    with timed(timings, "nightly run 2 (nothing new)"):
        second = start_run("resflow-nightly/resflow-nightly")
        state = wait_run(second, 600)
    assert state == "Completed", f"nightly run 2 ended {state}"
    again = read_record(params["output"], second)
    second_steps = [job.metadata.get("resflow_step") for job in ray_jobs(cluster, second)]
    assert again["new_files"] == [] and "restore" not in again and "restore" not in second_steps, again
    assert manifest_progress(params["output"]) == before and check_rows(params["input"], params["output"])[0] == rows
    log(f"drill 3 passed: nightly run 2 {state}, new files {again['new_files']}, Ray jobs {second_steps or 'none'}; "
        f"the output still holds {rows} rows, each once")

    # Drill 2: kill a Ray worker container mid-restore
    with timed(timings, "stage the kill drill's input"):
        stage_heavy(root)
    heavy = {"input": f"{root}/heavy/input", "output": f"{root}/heavy/restored", "model": f"{root}/heavy/model",
             "workers": 2, "batch_size": 2, "previews": 0, "quality_sample": 0}
    total_files = len(ids_by_file(heavy["input"]))
    total_rows = sum(map(len, ids_by_file(heavy["input"]).values()))
    with timed(timings, "restore run with a killed worker"):
        killed = start_run("resflow-restore/resflow-restore", heavy)
        files, rows_done = wait_for(lambda: (lambda p: p if p[0] > 0 else None)(manifest_progress(heavy["output"])),
                                    600, "the first restored file", poll_s=0.5)
        victim = cluster.container("ray-worker-2")
        on_victim = {}
        with contextlib.suppress(Exception):  # what the kill takes away, for the report
            [job] = ray_jobs(cluster, killed)
            on_victim = {key: n for key, n in actors_by_node(cluster, job, node_names(cluster)).items()
                         if key.startswith("ray-worker-2")}
        podman("kill", victim)
        # Read again after the kill: the fault struck with at least the first count and at most this one written
        files_after, rows_after = manifest_progress(heavy["output"])
        assert 0 < files and files_after < total_files, \
            f"the kill came too late: {files_after}/{total_files} files already done"
        log(f"drill 2: killed {victim} (running {on_victim or 'no replica'}) with {files}-{files_after} of "
            f"{total_files} files ({rows_done}-{rows_after} of {total_rows} rows) written")
        time.sleep(5)
        podman("rm", "-f", victim)  # the replacement node, as a Kubernetes pod would be restarted
        cluster.containers.remove(victim)
        start_ray_worker(cluster, 2, {**ray_env(cluster), **cluster.s3_env(f"http://{cluster.container('s3')}:8333")},
                         ("--shm-size", SHM_SIZE, *token_mount(cluster)))
        state = wait_run(killed, 1800)
    report_jobs(cluster, killed, "restore run with a killed worker")
    assert state == "Completed", f"the restore run ended {state}\n{cluster.logs('prefect-worker', 80)}"
    rows, statuses = check_rows(heavy["input"], heavy["output"])
    assert rows == total_rows and statuses == {"ok": total_rows}, statuses
    log(f"drill 2 passed: the run {state} after the kill at {rows_done}-{rows_after}/{total_rows} rows; "
        f"output holds all {rows} rows, each exactly once, all ok")
    log("cluster-e2e passed")
    return 0


def read_record(output_uri: str, flow_run_id: str) -> dict:
    from pipeline import storage

    return json.loads(storage.read_bytes(storage.join(output_uri, storage.RESFLOW_DIR, "runs", f"{flow_run_id}.json")))


def report_jobs(cluster: Cluster, flow_run_id: str, what: str) -> None:
    """Which Ray job ran which step, where its driver and its actors ran, how it ended."""
    names = node_names(cluster)
    log(f"{what}: flow run {flow_run_id} ran in {cluster.container('prefect-worker')}; its Ray jobs:")
    for job in ray_jobs(cluster, flow_run_id):
        seconds = ((job.end_time or 0) - (job.start_time or 0)) / 1000
        try:  # a report, not a check: the state API may lag
            where = ", ".join(f"{n} x {key}" for key, n in actors_by_node(cluster, job, names).items()) or "no actors"
        except Exception as error:  # noqa: BLE001
            where = f"actors unknown ({type(error).__name__})"
        print(f"    {job.metadata.get('resflow_step', '?'):<8} {job.status!s:<9} {seconds:5.0f} s  "
              f"driver on {names.get(job.driver_node_id, job.driver_node_id)}; {where}\n"
              f"             {job.submission_id}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
