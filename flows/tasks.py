"""Prefect tasks: small, typed wrappers over the pipeline's steps.

Each step runs in-process on local Ray, or, with RAY_ADDRESS set, as a Ray job
(flows/raybridge.py). Retries back off and happen only for failures a retry can fix
(connections, timeouts, storage outages, stalls, lost nodes); a bad schema, a bad
parameter or a model that cannot load fails at once.
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
from pipeline.images import SchemaError
from pipeline.modelio import ModelLoadError

RETRY_DELAYS_S = [2, 10, 30]
DETERMINISTIC = (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError, ModelLoadError, SchemaError,
                 NotImplementedError)


def retry_on_io(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry I/O failures, not deterministic ones."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, raybridge.StepFailed):
        return not error.deterministic
    if isinstance(error, DETERMINISTIC):
        return False
    return isinstance(error, Exception)


io_task = dict(retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=retry_on_io)


def _flow_run_id() -> str:
    return str(flow_run.id or "no-flow-run")


# --- registry and planning ---------------------------------------------------------------------


@task(**io_task)
def read_champion(registry_uri: str) -> dict | None:
    return registry.champion(registry_uri)


@task(**io_task)
def find_new_inputs(input_uri: str, output_uri: str, model: str, force: bool = False) -> dict:
    """Which input files this run must restore (new, changed, or done by another model)."""
    from pipeline.restore import RestoreJob, plan

    planned = plan(RestoreJob(input=input_uri, output=output_uri, model=model, force=force))
    get_run_logger().info(f"{len(planned.todo)} input file(s) to restore with {planned.model_version}, "
                          f"{len(planned.skipped)} already done")
    return {"todo": [info.uri for info in planned.todo], "skipped": len(planned.skipped),
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


# --- the steps -------------------------------------------------------------------------------


@task(**io_task)
def restore_step(input_uri: str, output_uri: str, model: str, workers: int | None = None, use_gpu: bool = False,
                 batch_size: int | None = None, tile: int = 512, force: bool = False) -> dict:
    logger = get_run_logger()
    progress_id = create_progress_artifact(0.0, key="restore-progress", description=f"Restoring {input_uri}")

    def on_progress(done: int, total: int) -> None:
        update_progress_artifact(progress_id, 100.0 * done / total if total else 100.0,
                                 description=f"{done}/{total} images restored")

    argv = ["restore", "--input", input_uri, "--output", output_uri, "--model", model, "--tile", str(tile), "--json"]
    argv += (["--workers", str(workers)] if workers else []) + (["--gpu"] if use_gpu else []) + (
        ["--force"] if force else []) + (["--batch-size", str(batch_size)] if batch_size else [])
    if raybridge.cluster_mode():
        report = raybridge.run_step_as_job("restore", argv, _flow_run_id(), logger.info, on_progress)
    else:
        from pipeline.restore import RestoreJob, restore_dataset

        job = RestoreJob(input=input_uri, output=output_uri, model=model, workers=workers, use_gpu=use_gpu,
                         batch_size=batch_size, tile=tile, force=force, progress=False)
        report = restore_dataset(job, log=logger.info, on_progress=on_progress).to_dict()
    update_progress_artifact(progress_id, 100.0, description=f"{report['images_ok']} ok, "
                                                            f"{report['images_failed']} failed")
    return report


@task(**io_task)
def train_step(data: str, val_data: str, registry_uri: str, preset: str = "cpu", max_minutes: float | None = None,
               workers: int | None = None, use_gpu: bool = False) -> dict:
    logger = get_run_logger()
    argv = ["train", "--data", data, "--val-data", val_data, "--output", registry_uri, "--preset", preset, "--json"]
    argv += (["--max-minutes", f"{max_minutes:g}"] if max_minutes else []) + (
        ["--workers", str(workers)] if workers else []) + (["--gpu"] if use_gpu else [])
    if raybridge.cluster_mode():
        summary = raybridge.run_step_as_job("train", argv, _flow_run_id(), logger.info)
    else:
        from pipeline.train import train, train_preset

        config = train_preset(preset, max_minutes=max_minutes, workers=workers, use_gpu=use_gpu or None)
        summary = train(data, val_data, registry_uri, config).summary()
    registry.record_training(registry_uri, summary["version"])
    logger.info(f"trained {summary['version']}: val PSNR {summary.get('val_psnr', float('nan')):.2f} dB")
    return summary


@task(**io_task)
def evaluate_step(model: str, data: str, noise_sigma: float | None = None) -> dict:
    logger = get_run_logger()
    argv = ["evaluate", "--model", model, "--data", data, "--json"] + (
        ["--noise-sigma", f"{noise_sigma:g}"] if noise_sigma is not None else [])
    if raybridge.cluster_mode():
        return raybridge.run_step_as_job("evaluate", argv, _flow_run_id(), logger.info)
    from pipeline.evaluate import evaluate

    summary = evaluate(model, data, noise_sigma=noise_sigma).summary()
    logger.info(f"{summary['model_version']} on {data}: PSNR {summary['input_psnr']:.2f} -> "
                f"{summary['output_psnr']:.2f} dB over {summary['images']} images")
    return summary


@task(**io_task)
def promote(registry_uri: str, version: str, reason: str) -> dict:
    record = registry.set_champion(registry_uri, version, reason=reason)
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
    restoring the same files twice."""
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
