"""Prefect tasks: small, typed wrappers over the pipeline.

`run_step` (pipeline/steps.py) runs any step's job (pipeline/jobs.py): in-process on local Ray, or, with
RAY_ADDRESS set, as a Ray job (flows/raybridge.py). Retries back off with jitter and
happen only for failures a retry can fix (storage outages, stalls, lost nodes, another
run holding the output); a job rejected as given (bad schema, bad parameter, a model that
does not load) fails at once. The retry budgets of every layer: docs/architecture.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from contextlib import ExitStack, contextmanager

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from flows import raybridge
from pipeline import registry, storage
from pipeline.jobs import Events, RestoreJob, failure_kind, step_of
from pipeline.steps import run_step

RETRY_DELAYS_S = [10, 60, 300]  # a step is minutes to hours of work: retry it few times, far apart
RETRY_JITTER = 0.5  # up to +50% per delay, so that runs that failed together do not retry together


def retry_on_io(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry what a retry can fix, nothing else."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, raybridge.StepFailed):
        return error.retryable
    return isinstance(error, Exception) and failure_kind(error) != "rejected"


io_task = dict(retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S, retry_jitter_factor=RETRY_JITTER,
               retry_condition_fn=retry_on_io)


def _flow_run_id() -> str:
    return str(flow_run.id or "no-flow-run")


class PrefectEvents(Events):
    """A step's log lines into the run's log; its progress into a progress artifact."""

    def __init__(self, step: str, description: str):
        self.logger = get_run_logger()
        self.step = step
        self.artifact = create_progress_artifact(0.0, key=f"{step}-progress", description=description)

    def log(self, message: str) -> None:
        self.logger.info(message)

    def progress(self, done: int, total: int) -> None:
        update_progress_artifact(self.artifact, 100.0 * done / total if total else 100.0,
                                 description=f"{self.step}: {done}/{total}")


@task(**io_task)
def run_step_task(job) -> dict:
    """Run a train, evaluate or restore job, here or on the Ray cluster; returns its result."""
    step = step_of(job)
    events = PrefectEvents(step, f"{step} {getattr(job, 'input', None) or getattr(job, 'data', '')}")
    if raybridge.cluster_mode():
        result = raybridge.run_job_on_cluster(job, _flow_run_id(), events)
    else:
        result = run_step(job, events)
    events.progress(1, 1)
    return result


# --- registry and planning ---------------------------------------------------------------------


@task(**io_task)
def read_champion(registry_uri: str) -> dict | None:
    return registry.champion(registry_uri)


@task(**io_task)
def find_new_inputs(job: RestoreJob) -> dict:
    """Which input files this run must restore (new, changed, or done by another model), and
    which were deleted since an earlier run."""
    from pipeline.restore import plan

    planned = plan(job)
    get_run_logger().info(f"{len(planned.todo)} input file(s) to restore with {planned.model_version}, "
                          f"{len(planned.skipped)} already done, {len(planned.gone)} deleted since an earlier run")
    return {"todo": [info.uri for info in planned.todo], "skipped": len(planned.skipped), "gone": planned.gone,
            "model_version": planned.model_version}


@task(**io_task)
def training_due(registry_uri: str, every_days: float) -> bool:
    """True when no challenger was trained in the last `every_days` days (0: never by cadence)."""
    if every_days <= 0:
        return False
    record = registry.last_training(registry_uri)
    if record is None:
        return True
    trained = dt.datetime.fromisoformat(record["trained_at"])
    return dt.datetime.now(dt.UTC) - trained >= dt.timedelta(days=every_days)


@task(**io_task)
def record_training(registry_uri: str, version: str) -> dict:
    return registry.record_training(registry_uri, version)


@task(**io_task)
def promote(registry_uri: str, version: str, reason: str, expected: str | None) -> dict:
    """Promote unless the champion changed since the decision (registry.set_champion)."""
    record = registry.set_champion(registry_uri, version, reason=reason, expected=expected)
    get_run_logger().info(f"champion is now {version}: {reason}")
    return record


@task(**io_task)
def write_record(output_uri: str, record: dict) -> str:
    """What the run did, next to its outputs: `<output>/_resflow/runs/<flow run id>.json`."""
    uri = storage.join(output_uri, storage.RESFLOW_DIR, "runs", f"{_flow_run_id()}.json")
    storage.write_bytes(uri, json.dumps(record, indent=2, sort_keys=True, default=str).encode())
    return uri


# --- one run per input at a time -------------------------------------------------------------


def input_lock_name(input_uri: str) -> str:
    return "resflow-input-" + hashlib.sha256(input_uri.rstrip("/").encode()).hexdigest()[:16]


def _ensure_limit(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass


@contextmanager
def input_lock(input_uri: str, timeout_s: float):
    """A global concurrency limit of 1 per input prefix: a second run on the same input
    waits for the first, then fails after `timeout_s` with a message instead of
    restoring the same files twice. (The output's lease, pipeline/lease.py, guards the
    output itself whatever starts the run.)"""
    name = input_lock_name(input_uri)
    _ensure_limit(name)
    held = ExitStack()
    try:
        held.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True))
    except TimeoutError as error:
        raise RuntimeError(f"another run is working on {input_uri} (concurrency limit {name}); gave up after "
                           f"{timeout_s:.0f} s. It will be picked up by the next run.") from error
    with held:
        yield name
