"""Start the Prefect worker of this installation's Kubernetes work pool, with its job template.

Runs in the worker pod (prefect-worker.yaml, mounted from a ConfigMap):
    python /etc/resflow/start_worker.py          # the pool named by RESFLOW_WORK_POOL

The pool's base job template (base-job-template.json beside this file) gets this pod's
namespace (RESFLOW_NAMESPACE, from the downward API) and the flow-run image
(RESFLOW_FLOW_IMAGE, which kustomize sets from the overlay's `images`) written into the
Job itself, not as variables: whoever may write deployments to the Prefect API can then
change a flow run's command and size, but not its image, namespace, service account,
labels or environment (the pod always holds the Ray token and the S3 keys, and its label
is what the NetworkPolicy admits). The template is stored on the Prefect API
(`prefect work-pool create --overwrite`: created, or updated to this version), then the
worker starts. Deployments registered with `resflow deploy --work-pool <pool>` run on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

TEMPLATE = Path(__file__).with_name("base-job-template.json")
# what a deployment's job variables must never reach (see the module docstring)
FIXED = ("image", "namespace", "service_account_name", "labels", "annotations", "env")


def job_template(namespace: str, image: str, template: Path = TEMPLATE) -> dict:
    """The work pool's base job template with this installation's namespace and image."""
    filled = json.loads(template.read_text())
    overridable = sorted(set(FIXED) & set(filled["variables"]["properties"]))
    if overridable:
        raise ValueError(f"{template.name}: {overridable} must be written into the Job, not offered as variables")
    configuration = filled["job_configuration"]
    configuration["namespace"] = namespace
    configuration["job_manifest"]["metadata"]["namespace"] = namespace
    [container] = configuration["job_manifest"]["spec"]["template"]["spec"]["containers"]
    container["image"] = image
    return filled


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default=os.environ.get("RESFLOW_WORK_POOL"),
                        help="the Kubernetes work pool to create or update, then serve (default: $RESFLOW_WORK_POOL)")
    args, worker_args = parser.parse_known_args(argv)
    if not args.pool:
        parser.error("name the work pool: --pool or RESFLOW_WORK_POOL (the overlay's resflow-settings)")
    template = job_template(os.environ["RESFLOW_NAMESPACE"], os.environ["RESFLOW_FLOW_IMAGE"])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(template, file)
    subprocess.run(["prefect", "work-pool", "create", args.pool, "--type", "kubernetes",
                    "--base-job-template", file.name, "--overwrite"], check=True)
    os.execvp("prefect", ["prefect", "worker", "start", "--pool", args.pool, "--type", "kubernetes", *worker_args])


if __name__ == "__main__":
    main()
