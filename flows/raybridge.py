"""Cluster mode: run a resflow step as a Ray job and follow it from a Prefect task.

With RAY_ADDRESS set, a flow does not become a Ray driver itself: each step
(`resflow train|restore|evaluate ... --json`) is submitted through the Ray Jobs API, its
log lines stream into the Prefect run's logs, and its last line (one JSON object) is the
step's result. Without RAY_ADDRESS the flows call the pipeline in-process on local Ray.

Submission ids are deterministic (`<base>-<attempt>`): a retried Prefect task attaches to
the job that is still pending, running or finished instead of starting a second one, and
moves to the next attempt number only when the previous job failed or was stopped.
Leaving the wait early (cancellation, an interrupt, the task's own timeout) stops the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable

from pipeline.cli import PROGRESS_PREFIX

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Forwarded to jobs when set: where storage is, never who we are. Credentials reach the
# cluster from its own environment (a Kubernetes Secret, the node's profile), not from
# the flow process, so they never show up in job records on the dashboard.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "RESFLOW_SHARED_DATA")


class StepFailed(RuntimeError):
    """A step's Ray job ended without success. `deterministic` is true when the step itself
    rejected its input (exit status 2: bad schema, bad parameters), which no retry fixes."""

    def __init__(self, message: str, deterministic: bool = False):
        super().__init__(message)
        self.deterministic = deterministic


def cluster_mode() -> bool:
    return bool(os.environ.get("RAY_ADDRESS"))


def jobs_address() -> str:
    """The Jobs API (the dashboard's HTTP address): RAY_DASHBOARD_ADDRESS, else RAY_ADDRESS
    when it is already an http(s) address, else the dashboard Ray reports for RAY_ADDRESS."""
    explicit = os.environ.get("RAY_DASHBOARD_ADDRESS")
    address = os.environ.get("RAY_ADDRESS", "")
    if explicit:
        return explicit
    if address.startswith(("http://", "https://")):
        return address
    import ray

    context = ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        url = context.dashboard_url
    finally:
        ray.shutdown()
    if not url:
        raise RuntimeError(f"the Ray cluster at {address} runs no dashboard, so jobs cannot be submitted; "
                           f"start its head with --include-dashboard=true or set RAY_DASHBOARD_ADDRESS")
    return url if url.startswith("http") else f"http://{url}"


def submission_base(step: str, flow_run_id: str, argv: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:10]
    return f"resflow-{step}-{flow_run_id}-{digest}"


def entrypoint(argv: list[str]) -> str:
    return "python -m pipeline.cli " + " ".join(shlex.quote(arg) for arg in argv)


def _client(address: str | None = None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or jobs_address())


def _status(client, submission_id: str) -> str | None:
    try:
        return str(client.get_job_status(submission_id)).split(".")[-1]
    except RuntimeError as error:  # the Jobs API answers 404 as a RuntimeError
        if "does not exist" in str(error) or "404" in str(error):
            return None
        raise


def submit_or_attach(client, base: str, argv: list[str], log: Callable[[str], None]) -> str:
    """Attach to this step's live or finished job, else submit the next attempt."""
    attempt = 1
    while True:
        submission_id = f"{base}-{attempt}"
        status = _status(client, submission_id)
        if status is None:
            env = {key: os.environ[key] for key in FORWARDED_ENV if os.environ.get(key)}
            env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"  # no terminal: progress reaches Prefect as an artifact
            log(f"submitting Ray job {submission_id}: {entrypoint(argv)}")
            # Nothing runs between submitting and returning the id, so whoever leaves
            # early from here on knows which job to stop.
            return client.submit_job(entrypoint=entrypoint(argv), submission_id=submission_id,
                                     runtime_env={"env_vars": env}, metadata={"resflow_step": argv[0]})
        if status not in ("FAILED", "STOPPED"):
            log(f"attaching to Ray job {submission_id} ({status}): a retried task does not start a second job")
            return submission_id
        attempt += 1


def run_step_as_job(step: str, argv: list[str], flow_run_id: str, log: Callable[[str], None],
                    on_progress: Callable[[int, int], None] | None = None, poll_s: float = 2.0,
                    address: str | None = None) -> dict:
    """Run `resflow <argv>` as a Ray job, stream its logs to `log`, return its JSON result."""
    client = _client(address)
    submission_id = None
    seen = 0
    text = ""
    status = None
    try:
        submission_id = submit_or_attach(client, submission_base(step, flow_run_id, argv), argv, log)
        while True:
            status = _status(client, submission_id)
            text = client.get_job_logs(submission_id)
            for line in text[seen:].splitlines():
                if line.startswith(PROGRESS_PREFIX) and on_progress:
                    done, total = line[len(PROGRESS_PREFIX):].split()[0].split("/")
                    on_progress(int(done), int(total))
                elif line.strip():
                    log(line)
            seen = len(text)
            if status in TERMINAL:
                break
            time.sleep(poll_s)
    finally:
        if submission_id and status not in TERMINAL:
            # Stop first, then say so: the logger itself may be what is being interrupted.
            try:
                client.stop_job(submission_id)
                print(f"stopped Ray job {submission_id}: its Prefect task is no longer waiting for it",
                      file=sys.stderr)
            except Exception as error:  # noqa: BLE001 - the original exception matters more
                print(f"could not stop Ray job {submission_id}: {error}", file=sys.stderr)
    if status != "SUCCEEDED":
        info = client.get_job_info(submission_id)
        tail = "\n".join(text.strip().splitlines()[-5:])
        rejected = f"resflow {argv[0]}: error:" in text  # the CLI's one-line job-level error, exit status 2
        raise StepFailed(f"Ray job {submission_id} {status}: {info.message or ''}\n{tail}", deterministic=rejected)
    return parse_result(text, submission_id)


def parse_result(text: str, submission_id: str = "job") -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise StepFailed(f"{submission_id} succeeded but printed no JSON result line")


def stop_flow_run_jobs(flow_run_id: str, address: str | None = None) -> list[str]:
    """Stop every unfinished Ray job a flow run submitted (its cancellation hook)."""
    client = _client(address)
    stopped = []
    for job in client.list_jobs():
        submission_id = job.submission_id or ""
        if f"-{flow_run_id}-" in submission_id and str(job.status).split(".")[-1] not in TERMINAL:
            client.stop_job(submission_id)
            stopped.append(submission_id)
    return stopped
