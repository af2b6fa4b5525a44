"""Multi-node behaviour on one machine: a head (0 CPUs) and two 3-CPU worker nodes, each its own
raylet and object store (local/ray_nodes.py). Steps run as Ray jobs, the way the
flows run them in cluster mode."""

import json
import shlex
import time

import pytest

from flows import raybridge
from local import ray_nodes
from pipeline import storage
from pipeline.config import RestoreSettings, train_preset
from pipeline.dataset import read_table
from pipeline.ingest import ingest
from pipeline.jobs import Events, RestoreJob, TrainJob, job_from_json, read_event
from pipeline.manifest import Manifest
from pipeline.modelio import save_model
from pipeline.models import build_model
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """Started after the S3 variables are set: the nodes (and so the jobs) inherit them."""
    state_dir = tmp_path_factory.mktemp("cluster")
    started = ray_nodes.start(state_dir, nodes=3, cpus_per_node=3, head_cpus=0, object_store_mb=512)
    yield started  # this process's environment is left alone: `cluster_env` sets it per test
    ray_nodes.stop(state_dir)


@pytest.fixture
def cluster_env(cluster, monkeypatch):
    for key, value in cluster.env().items():
        monkeypatch.setenv(key, value)
    return cluster


def jobs(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url)


def submit(cluster, job, name: str) -> str:
    """Submit a step's job the way the flows do in cluster mode (`python -m pipeline.steps JSON`)."""
    submission_id = f"test-{name}-{time.time_ns()}"
    jobs(cluster).submit_job(entrypoint=raybridge.entrypoint(job), submission_id=submission_id,
                             runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    return submission_id


def result_of(logs: str) -> dict:
    """The step's result: the last event line of its log."""
    events = [event for event in map(read_event, logs.splitlines()) if event]
    assert events and events[-1]["resflow_event"] == "result", logs[-3000:]
    return events[-1]["result"]


def wait(cluster, submission_id: str, timeout: float = 600) -> str:
    client = jobs(cluster)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(submission_id)).split(".")[-1]
        if status in raybridge.TERMINAL:
            return status
        time.sleep(1)
    client.stop_job(submission_id)
    raise AssertionError(f"job {submission_id} still running after {timeout} s:\n"
                         f"{client.get_job_logs(submission_id)[-3000:]}")


def actor_nodes(cluster, class_fragment: str, alive_only: bool = False) -> set[str]:
    from ray.util.state import list_actors

    found = list_actors(address=cluster.dashboard_url, limit=1000, raise_on_missing_output=False)
    return {actor.node_id for actor in found if class_fragment in actor.class_name
            and (not alive_only or actor.state == "ALIVE")}


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def heavy_input(s3_server):
    """99 Train400 images in 13 files, and an untrained DnCNN-S (17 x 64): slow enough on
    2 cores (~30 s) that a node can be killed mid-restore."""
    root = f"s3://tests/cluster-{time.time_ns()}"
    ingest(str(shared_data("Train400")) + "/test_0[0-9][0-9].png", root + "/input", rows_per_file=8, progress=False)
    save_model(root + "/model", build_model("dncnn", depth=17, width=64), version="dncnn-s-untrained")
    return root


def test_cluster_has_three_live_nodes(cluster):
    assert ray_nodes.alive_nodes(cluster.gcs_address) == 3


def test_restore_spreads_over_nodes_and_a_lost_node_loses_no_row(cluster, heavy_input):
    input_uri, output = heavy_input + "/input", heavy_input + "/restored"
    inputs = storage.list_files(input_uri)
    expected = {info.uri.rsplit("/", 1)[1]: read_table(info.uri, columns=["image_id"])["image_id"].to_pylist()
                for info in inputs}
    # 2 CPUs per replica on 3-CPU nodes: the replicas cannot share a node (Ray's spreading
    # of small actors is best effort), and each node keeps a CPU for reads and writes.
    job = RestoreJob(input=input_uri, output=output, model=heavy_input + "/model", workers=2, cpus_per_worker=2,
                     settings=RestoreSettings(batch_size=2), stall_timeout_s=45)
    first = submit(cluster, job, "restore")
    manifest = Manifest(output, "manifest")
    wait_for(lambda: manifest.all(), 300, "the first restored file")
    # Both replicas start at once, one per worker node (2 CPUs each on 3-CPU nodes).
    wait_for(lambda: len(actor_nodes(cluster, "UnitRestorer")) == 2, 120, "replicas on both worker nodes")

    done_at_fault = len(manifest.all())
    ray_nodes.kill_raylet(cluster, "node-2")  # the machine is gone, mid-run
    assert 0 < done_at_fault < len(expected)  # the fault struck mid-run: some files done, not all
    status = wait(cluster, first)
    ray_nodes.restart_node(cluster.state_dir, "node-2")
    if status != "SUCCEEDED":  # Ray did not recover by itself: the job failed or stalled cleanly; rerun it
        rerun = submit(cluster, job, "restore-rerun")
        assert wait(cluster, rerun) == "SUCCEEDED", jobs(cluster).get_job_logs(rerun)[-4000:]

    outputs = {info.uri.rsplit("/", 1)[1]: info.uri for info in storage.list_files(output)}
    assert set(outputs) == set(expected)  # one output per input, nothing half-written beside them
    for name, ids in expected.items():
        table = read_table(outputs[name], columns=["image_id", "status"])
        assert table["image_id"].to_pylist() == ids  # every row exactly once, in order
        assert set(table["status"].to_pylist()) == {"ok"}
    assert len(manifest.all()) == len(expected)


def test_training_places_workers_on_two_nodes_and_resumes_after_losing_one(cluster, train400_small, s3_prefix):
    registry_uri = s3_prefix + "/models"
    # 2 CPUs per worker on 3-CPU nodes: the workers cannot share a node, and each node keeps
    # a CPU for the Ray Data tasks that feed them (without it they starve: a silent hang).
    config = train_preset("tiny", epochs=5, workers=2, cpus_per_worker=2)
    job = submit(cluster, TrainJob(data=train400_small + "/train", val_data=train400_small + "/val",
                                   registry=registry_uri, config=config, run_name="cluster-drill"), "train")
    checkpoints = storage.join(registry_uri, "_runs", "cluster-drill")

    snapshot = storage.join(checkpoints, "checkpoint_manager_snapshot.json")

    def first_checkpoint_registered():
        # Rank 0 uploads a checkpoint's files before Ray Train's controller registers it; a node
        # lost in between restarts from scratch. The controller's own snapshot says it is registered.
        return storage.exists(snapshot) and json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result")

    wait_for(first_checkpoint_registered, 400, "the first registered training checkpoint")
    assert len(actor_nodes(cluster, "RayTrainWorker", alive_only=True)) == 2
    ray_nodes.kill_raylet(cluster, "node-2")
    time.sleep(3)
    ray_nodes.restart_node(cluster.state_dir, "node-2")  # a replacement node joins
    status = wait(cluster, job)
    logs = jobs(cluster).get_job_logs(job)
    assert status == "SUCCEEDED", logs[-3000:]
    summary = result_of(logs)
    # resumed from a checkpoint, not from scratch
    assert summary["restarts"] >= 1 and summary["resumed_from"] >= 1, logs[-3000:]
    assert storage.exists(storage.join(summary["model"], "model.json"))


def test_flows_in_cluster_mode_submit_attach_and_stop_ray_jobs(prefect_api, cluster_env, heavy_input, trained_model,
                                                                s3_prefix):
    from flows.flows import restore_flow

    cluster = cluster_env
    noisy = heavy_input + "/input"
    state = restore_flow(input=noisy, output=s3_prefix + "/out", model=trained_model, workers=2, batch_size=4,
                         previews=1, quality_sample=0, return_state=True)
    report = state.result()
    assert report["images_ok"] == 99 and report["images_failed"] == 0
    flow_run_id = str(state.state_details.flow_run_id)
    submitted = [job for job in jobs(cluster).list_jobs() if f"-{flow_run_id}-" in (job.submission_id or "")]
    assert len(submitted) == 1 and str(submitted[0].status).endswith("SUCCEEDED")

    # A retried task with the same flow run and job attaches instead of submitting again.
    job = job_from_json(shlex.split(submitted[0].entrypoint)[3])
    base = submitted[0].submission_id.rsplit("-", 1)[0]
    assert base == raybridge.submission_base(job, flow_run_id)
    again = raybridge.submit_or_attach(jobs(cluster), base, job, log=lambda line: None)
    assert again == submitted[0].submission_id
    assert len([j for j in jobs(cluster).list_jobs() if f"-{flow_run_id}-" in (j.submission_id or "")]) == 1

    # Leaving the wait (cancellation, an interrupt) stops the job instead of orphaning it.
    class Interrupting(Events):
        def log(self, line):
            if not line.startswith("submitting"):  # the job's own output: it is running
                raise KeyboardInterrupt

    slow = RestoreJob(input=noisy, output=s3_prefix + "/cancelled", model=heavy_input + "/model")
    with pytest.raises(KeyboardInterrupt):
        raybridge.run_job_on_cluster(slow, "cancel-drill", Interrupting(), address=cluster.dashboard_url)
    stopped = [j for j in jobs(cluster).list_jobs() if "-cancel-drill-" in (j.submission_id or "")]
    assert len(stopped) == 1
    final = wait_for(lambda: (lambda status: status in raybridge.TERMINAL and status)(
        str(jobs(cluster).get_job_status(stopped[0].submission_id)).split(".")[-1]), 60, "the interrupted job to end")
    assert final == "STOPPED", jobs(cluster).get_job_logs(stopped[0].submission_id)[-2000:]
    done = Manifest(s3_prefix + "/cancelled", "manifest").all()
    for info in storage.list_files(s3_prefix + "/cancelled"):  # whatever was published is a whole file
        entry = next(e for e in done.values() if e["output"] == info.uri)
        assert read_table(info.uri).num_rows == entry["rows"]

    # A job rejected as given comes back with its reason and exit status 2, and is not retried.
    missing = RestoreJob(input=s3_prefix + "/missing", output=s3_prefix + "/never", model=heavy_input + "/model")
    with pytest.raises(raybridge.StepFailed) as rejected:
        raybridge.run_job_on_cluster(missing, "reject-drill", Events(), address=cluster.dashboard_url)
    assert "(exit status 2)" in str(rejected.value) and "no Parquet files under" in str(rejected.value)
    assert not rejected.value.retryable
