"""Restore throughput on a local multi-node Ray cluster with 1, 2 and 3 worker nodes.

    .venv/bin/python -m bench.cluster_scaling [--images 200] [--nodes 1 2 3]

Every configuration is a fresh `resflow cluster` (local/ray_nodes.py): a head with
0 CPUs plus k worker nodes of 2 logical CPUs, one model replica per worker node; the
restore runs as a Ray job, as the flows run it in cluster mode. All nodes share this
machine's physical cores, so the figure measures the cost of spreading over nodes
(scheduling, object transfer between object stores), not a speed-up. Data: Train400
images with Gaussian noise, 10 per Parquet file; model: a freshly initialised DnCNN
10 x 32 (speed does not depend on the weights). Writes bench/results/cluster_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from flows import raybridge
from local import ray_nodes, s3server
from pipeline.config import RestoreSettings
from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation
from pipeline.ingest import ingest
from pipeline.jobs import RestoreJob, read_event
from pipeline.modelio import save_model
from pipeline.models import build_model

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def run_job(cluster, job) -> tuple[dict, float]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    started = time.time()
    submission_id = client.submit_job(entrypoint=raybridge.entrypoint(job),
                                      runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    while str(client.get_job_status(submission_id)).split(".")[-1] not in raybridge.TERMINAL:
        time.sleep(0.5)
    wall = time.time() - started
    logs = client.get_job_logs(submission_id)
    if not str(client.get_job_status(submission_id)).endswith("SUCCEEDED"):
        raise RuntimeError(logs[-3000:])
    events = [event for event in map(read_event, logs.splitlines()) if event]
    return events[-1]["result"], wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    os.environ.update(ray_nodes.AUTH_ENV)
    results = []
    with s3server.embedded(REPO / ".bench" / "s3", buckets=("bench",)):
        root = f"s3://bench/scaling-{time.strftime('%Y%m%d-%H%M%S')}"
        source = Path(tempfile.mkdtemp(prefix="scaling-"))
        for path in sorted((DATA / "Train400").glob("*.png"))[: args.images]:
            (source / path.name).write_bytes(path.read_bytes())
        ingest(str(source), root + "/clean", rows_per_file=10, progress=False)
        degrade_dataset(root + "/clean", root + "/noisy", Degradation(noise_sigma=25), progress=False)
        save_model(root + "/model", build_model("dncnn", depth=10, width=32), version="dncnn-10x32")
        for nodes in args.nodes:
            state_dir = Path(tempfile.mkdtemp(prefix="scaling-cluster-"))
            cluster = ray_nodes.start(state_dir, nodes=nodes + 1, cpus_per_node=2, head_cpus=0)
            try:
                job = RestoreJob(input=root + "/noisy", output=f"{root}/out-{nodes}", model=root + "/model",
                                 workers=nodes, settings=RestoreSettings(batch_size=4))
                report, wall = run_job(cluster, job)
            finally:
                ray_nodes.stop(state_dir)
            row = {"worker_nodes": nodes, "replicas": nodes, "images": report["images_ok"],
                   "megapixels": round(report["megapixels"], 3), "restore_seconds": round(report["seconds"], 1),
                   "job_wall_seconds": round(wall, 1), "megapixels_per_s": round(report["megapixels_per_s"], 3)}
            results.append(row)
            print(json.dumps(row), flush=True)
    base = results[0]["megapixels_per_s"]
    for row in results:
        row["vs_1_node"] = round(row["megapixels_per_s"] / base, 2)
    out = REPO / "bench" / "results" / "cluster_scaling.json"
    out.write_text(json.dumps({"machine": f"{os.cpu_count()} logical CPUs", "model": "dncnn 10x32",
                               "results": results}, indent=2))
    print(f"\n{'worker nodes':>12} {'MP':>6} {'restore s':>9} {'job wall s':>10} {'MP/s':>7} {'vs 1':>5}")
    for row in results:
        print(f"{row['worker_nodes']:>12} {row['megapixels']:>6.2f} {row['restore_seconds']:>9.1f} "
              f"{row['job_wall_seconds']:>10.1f} {row['megapixels_per_s']:>7.3f} {row['vs_1_node']:>5.2f}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
