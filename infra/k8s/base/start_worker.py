"""Start the Prefect worker of the Kubernetes work pool, with this installation's job template.

Runs in the worker pod (prefect-worker.yaml, mounted from a ConfigMap):
    python /etc/resflow/start_worker.py --pool resflow-k8s

The pool's base job template (base-job-template.json beside this file) gets this pod's
namespace (RESFLOW_NAMESPACE, from the downward API) and the flow-run image
(RESFLOW_FLOW_IMAGE, which kustomize sets from the overlay's `images`) as its defaults,
so neither is written a second time. The template is stored on the Prefect API
(`prefect work-pool create --overwrite`: created, or updated to this version), then the
worker starts. Deployments registered with `resflow deploy --work-pool resflow-k8s` run on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

TEMPLATE = Path(__file__).with_name("base-job-template.json")


def job_template(namespace: str, image: str, template: Path = TEMPLATE) -> dict:
    """The work pool's base job template with this installation's namespace and image."""
    filled = json.loads(template.read_text())
    variables = filled["variables"]["properties"]
    variables["namespace"]["default"] = namespace
    variables["image"]["default"] = image
    return filled


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True, help="the Kubernetes work pool to create or update, then serve")
    args, worker_args = parser.parse_known_args(argv)
    template = job_template(os.environ["RESFLOW_NAMESPACE"], os.environ["RESFLOW_FLOW_IMAGE"])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(template, file)
    subprocess.run(["prefect", "work-pool", "create", args.pool, "--type", "kubernetes",
                    "--base-job-template", file.name, "--overwrite"], check=True)
    os.execvp("prefect", ["prefect", "worker", "start", "--pool", args.pool, "--type", "kubernetes", *worker_args])


if __name__ == "__main__":
    main()
