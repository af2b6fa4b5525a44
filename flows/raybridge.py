"""Cluster mode: run a step's job as a Ray job and follow it from a Prefect task.

With RAY_ADDRESS set, a flow does not become a Ray driver itself: each step's job is
submitted through the Ray Jobs API as `python -m pipeline.steps '<job as JSON>'`, its log
streams into the Prefect run's logs as it is written (`tail_job_logs`), its events
(progress, the result: JSON lines, pipeline/jobs.py) are read as data, and its exit status
says whether a retry can help. Without RAY_ADDRESS the flows run the job in-process.

Submission ids are deterministic (`<base>-<attempt>`): a retried Prefect task attaches to
the job that is still pending, running or finished instead of starting a second one, and
moves to the next attempt number only when the previous job failed or was stopped.
Leaving the wait early (cancellation, an interrupt, the task's own timeout) stops the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import shlex
import sys
import threading
import time
from collections.abc import Callable

from pipeline.jobs import EXIT_REJECTED, Events, job_to_json, read_event, step_of

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Forwarded to jobs when set: where storage is, never who we are. Credentials reach the
# cluster from its own environment (a Kubernetes Secret, the node's profile), not from
# the flow process, so they never show up in job records on the dashboard.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "RESFLOW_SHARED_DATA",
                 "RESFLOW_S3_REQUEST_TIMEOUT_S")


class StepFailed(RuntimeError):
    """A step's Ray job ended without success; `retryable` says whether another attempt can
    help (the job's exit status: 2 means the job was rejected as given)."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


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


def submission_base(job, flow_run_id: str) -> str:
    digest = hashlib.sha256(job_to_json(job).encode()).hexdigest()[:10]
    return f"resflow-{step_of(job)}-{flow_run_id}-{digest}"


def entrypoint(job) -> str:
    return "python -m pipeline.steps " + shlex.quote(job_to_json(job))


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


def submit_or_attach(client, base: str, job, log: Callable[[str], None]) -> str:
    """Attach to this step's live or finished job, else submit the next attempt."""
    attempt = 1
    while True:
        submission_id = f"{base}-{attempt}"
        status = _status(client, submission_id)
        if status is None:
            env = {key: os.environ[key] for key in FORWARDED_ENV if os.environ.get(key)}
            env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"  # no terminal: progress reaches Prefect as events
            log(f"submitting Ray job {submission_id}: {entrypoint(job)}")
            # Nothing runs between submitting and returning the id, so whoever leaves
            # early from here on knows which job to stop.
            return client.submit_job(entrypoint=entrypoint(job), submission_id=submission_id,
                                     runtime_env={"env_vars": env}, metadata={"resflow_step": step_of(job)})
        if status not in ("FAILED", "STOPPED"):
            log(f"attaching to Ray job {submission_id} ({status}): a retried task does not start a second job")
            return submission_id
        attempt += 1


def _follow(client, submission_id: str, lines: queue.Queue) -> None:
    """Stream the job's log into `lines` until the job ends (run on a thread of its own)."""
    async def tail():
        pending = ""
        async for chunk in client.tail_job_logs(submission_id):
            pending += chunk
            *complete, pending = pending.split("\n")
            for line in complete:
                lines.put(line)
        if pending:
            lines.put(pending)

    try:
        asyncio.run(tail())
    except Exception as error:  # the stream broke; the status poll below still decides the outcome
        lines.put(error)
    lines.put(None)


def run_job_on_cluster(job, flow_run_id: str, events: Events, address: str | None = None) -> dict:
    """Run `job` as a Ray job, stream its log and events into `events`, return its result."""
    client = _client(address)
    submission_id, status, result, error = None, None, None, None
    tail: list[str] = []
    try:
        submission_id = submit_or_attach(client, submission_base(job, flow_run_id), job, events.log)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_follow, args=(client, submission_id, lines), daemon=True,
                         name=f"resflow-logs-{submission_id}").start()
        while (line := lines.get()) is not None:
            if isinstance(line, Exception):
                events.log(f"log stream of {submission_id} broke ({line}); waiting for the job's status")
                continue
            event = read_event(line)
            if event is None:
                if line.strip():
                    events.log(line)
                    tail = (tail + [line])[-5:]
            elif event["resflow_event"] == "progress":
                events.progress(event["done"], event["total"])
            elif event["resflow_event"] == "result":
                result = event["result"]
            elif event["resflow_event"] == "error":
                error = event
        status = _wait_terminal(client, submission_id)
    finally:
        if submission_id and status not in TERMINAL:
            # Stop first, then say so: the logger itself may be what is being interrupted.
            try:
                client.stop_job(submission_id)
                print(f"stopped Ray job {submission_id}: its Prefect task is no longer waiting for it",
                      file=sys.stderr)
            except Exception as stop_error:  # noqa: BLE001 - the original exception matters more
                print(f"could not stop Ray job {submission_id}: {stop_error}", file=sys.stderr)
    if status == "SUCCEEDED" and result is not None:
        return result
    info = client.get_job_info(submission_id)
    exit_status = getattr(info, "driver_exit_code", None)
    reason = (f"{error['error']}: {error['message']}" if error else
              f"{info.message or ''} " + "\n".join(tail)).strip()
    raise StepFailed(f"Ray job {submission_id} {status} (exit status {exit_status}): {reason}",
                     retryable=exit_status not in (EXIT_REJECTED,) and not (error and error["kind"] == "rejected"))


def _wait_terminal(client, submission_id: str, poll_s: float = 1.0) -> str:
    """The log stream ends with the job; its status may take a moment to follow."""
    while (status := _status(client, submission_id)) not in TERMINAL:
        time.sleep(poll_s)
    return status


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
