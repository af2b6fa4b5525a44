"""resflow's Prefect flows: restore, train, evaluate, challenge, and the nightly run.

    # one run now (an ephemeral Prefect API unless PREFECT_API_URL is set; local Ray unless RAY_ADDRESS is)
    resflow flow nightly --param input=s3://resflow/incoming --param output=s3://resflow/restored
    # every night: see flows/deploy.py (`resflow deploy`, `resflow serve`)

The nightly flow (1) finds the input files that arrived since the last run (the restore
manifest), (2) restores them with the registry's champion, (3) when asked or when the
cadence says so, trains a challenger, evaluates it and the champion on the held-out set
and promotes the challenger only if it is better by `min_gain_db`, (4) records what it
did: `<output>/_resflow/runs/<flow run id>.json` and artifacts in the Prefect UI.

Parameters are what a person types in the UI's run form; each flow turns them into the
step's job (pipeline/jobs.py) and runs it through one task, `tasks.run_step_task`.
Defaults of settings are read from their one home (pipeline/config.py), not restated.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import artifacts, raybridge, tasks
from pipeline.config import RestoreSettings, train_preset
from pipeline.jobs import EvaluateJob, RestoreJob, TrainJob, restore_job

DEFAULTS = {  # the demo's layout in the local S3 server; every one is a flow parameter
    "input": "s3://resflow/incoming",
    "output": "s3://resflow/restored",
    "registry": "s3://resflow/models",
    "train_data": "s3://resflow/train400/train",
    "val_data": "s3://resflow/train400/val",
}
QUALITY_SAMPLE = 16  # restored images scored against their clean target, where the input has one


def stop_ray_jobs(flow, flow_run, state) -> None:
    """On cancellation (or a crash) stop the Ray jobs this flow run submitted."""
    if raybridge.cluster_mode():
        stopped = raybridge.stop_flow_run_jobs(str(flow_run.id))
        print(f"stopped Ray job(s) of flow run {flow_run.id}: {stopped or 'none running'}", file=sys.stderr)


hooks = dict(on_cancellation=[stop_ray_jobs], on_crashed=[stop_ray_jobs])


@flow(name="resflow-restore", log_prints=True, **hooks)
def restore_flow(input: str = DEFAULTS["input"], output: str = DEFAULTS["output"], model: str = DEFAULTS["registry"],
                 workers: int | None = None, use_gpu: bool = False, batch_size: int | None = None,
                 tile: int = RestoreSettings.tile, force: bool = False, previews: int = 4,
                 quality_sample: int = QUALITY_SAMPLE, skip_below: float | None = RestoreSettings.skip_below,
                 prune: bool = RestoreJob.prune) -> dict:
    """Restore every new or changed Parquet file under `input` into `output`; images whose
    estimated noise sigma is below `skip_below` are left untouched; with `prune`, what is
    left of input files deleted since an earlier run is removed."""
    job = restore_job(input, output, model, workers=workers, use_gpu=use_gpu, batch_size=batch_size, tile=tile,
                      force=force, skip_below=skip_below, prune=prune)
    return restore_and_report(job, previews, quality_sample)


def restore_and_report(job: RestoreJob, previews: int, quality_sample: int) -> dict:
    """Run a restore job, then draw its artifacts (previews, quality on a sample, noise)."""
    report = tasks.run_step_task(job)
    report["metrics"] = artifacts.restore_artifacts(report, job.input, job.model, previews, quality_sample)
    return report


@flow(name="resflow-train", log_prints=True, **hooks)
def train_flow(data: str = DEFAULTS["train_data"], val_data: str = DEFAULTS["val_data"],
               registry: str = DEFAULTS["registry"], preset: str = "cpu", max_minutes: float | None = 20,
               workers: int | None = None, use_gpu: bool = False, self_supervised: bool = False) -> dict:
    """Train a model version into the registry (it is not promoted; see `challenge_flow`).
    `self_supervised` learns from noisy-only data (no target column, no clean images)."""
    config = train_preset(preset, max_minutes=max_minutes, workers=workers, use_gpu=use_gpu or None,
                          self_supervised=self_supervised or None)
    summary = tasks.run_step_task(TrainJob(data=data, val_data=val_data, registry=registry, config=config))
    tasks.record_training(registry, summary["version"])
    get_run_logger().info(f"trained {summary['version']}: validation score {summary.get('val_score', float('nan')):.2f} dB")
    artifacts.training_artifact(summary, data)
    return summary


@flow(name="resflow-evaluate", log_prints=True, **hooks)
def evaluate_flow(model: str = DEFAULTS["registry"], data: str = DEFAULTS["val_data"],
                  noise_sigma: float | None = 25.0) -> dict:
    """PSNR/SSIM of a model (or a registry's champion) on a paired dataset, or on clean data
    with the protocol's Gaussian noise at `noise_sigma`."""
    summary = tasks.run_step_task(EvaluateJob(model=model, data=data, noise_sigma=noise_sigma))
    artifacts.evaluation_artifact([summary], key="evaluation", description=f"Evaluation on {data}")
    return summary


@flow(name="resflow-challenge", log_prints=True, **hooks)
def challenge_flow(challenger: str, registry: str = DEFAULTS["registry"], val_data: str = DEFAULTS["val_data"],
                   noise_sigma: float | None = 25.0, min_gain_db: float = 0.05) -> dict:
    """Evaluate a challenger version and the champion on the held-out set; promote the
    challenger only if its PSNR is higher by at least `min_gain_db` (or if there is no
    champion yet)."""
    logger = get_run_logger()
    version = challenger.rstrip("/").rsplit("/", 1)[-1]
    champion = tasks.read_champion(registry)
    challenger_scores = tasks.run_step_task(EvaluateJob(model=challenger, data=val_data, noise_sigma=noise_sigma))
    rows = [{"role": "challenger", **challenger_scores}]
    if champion is None:
        promoted, reason = True, "no champion yet"
    else:
        champion_scores = tasks.run_step_task(EvaluateJob(model=champion["uri"], data=val_data, noise_sigma=noise_sigma))
        rows.append({"role": "champion", **champion_scores})
        gain = challenger_scores["output_psnr"] - champion_scores["output_psnr"]
        promoted = gain >= min_gain_db
        reason = (f"{gain:+.3f} dB PSNR on {val_data} versus {champion['version']} "
                  f"({'>=' if promoted else '<'} {min_gain_db:g} dB needed)")
    if promoted:
        tasks.promote(registry, version, reason, expected=champion["version"] if champion else None)
    else:
        logger.info(f"{version} is not promoted: {reason}; the champion stays {champion['version']}")
    artifacts.evaluation_artifact(rows, key="challenge", description=f"Challenger vs champion on {val_data}")
    create_markdown_artifact(f"# {'Promoted' if promoted else 'Not promoted'}: `{version}`\n\n{reason}",
                             key="promotion", description="Champion decision")
    return {"challenger": version, "promoted": promoted, "reason": reason, "scores": rows}


@flow(name="resflow-nightly", log_prints=True, **hooks)
def nightly_flow(input: str = DEFAULTS["input"], output: str = DEFAULTS["output"],
                 registry: str = DEFAULTS["registry"], train_data: str = DEFAULTS["train_data"],
                 val_data: str = DEFAULTS["val_data"], val_noise_sigma: float | None = 25.0,
                 train_challenger: bool = False, train_every_days: float = 7.0, train_preset: str = "cpu",
                 train_minutes: float = 20.0, min_gain_db: float = 0.05, workers: int | None = None,
                 use_gpu: bool = False, batch_size: int | None = None, tile: int = RestoreSettings.tile,
                 previews: int = 4, lock_timeout_s: float = 900.0,
                 skip_below: float | None = RestoreSettings.skip_below, prune: bool = RestoreJob.prune) -> dict:
    """Restore what arrived since the last run with the champion; train and challenge on a cadence.
    With `prune`, what is left of input files deleted since an earlier night is removed."""
    logger = get_run_logger()
    record: dict = {"input": input, "output": output, "registry": registry}
    if tasks.read_champion(registry) is None:
        logger.info(f"no champion in {registry}: training a first model on {train_data}")
        first = train_flow(train_data, val_data, registry, preset=train_preset, max_minutes=train_minutes,
                           workers=workers, use_gpu=use_gpu)
        record["bootstrap"] = challenge_flow(first["model"], registry, val_data, val_noise_sigma, min_gain_db)
    champion = tasks.read_champion(registry)
    record["champion"] = champion["version"]

    # One job, built once: what is planned is what runs (a threshold that only the restore
    # saw made every night plan every file as new, then restore nothing).
    job = restore_job(input, output, registry, workers=workers, use_gpu=use_gpu, batch_size=batch_size, tile=tile,
                      skip_below=skip_below, prune=prune)
    with tasks.input_lock(input, lock_timeout_s):
        plan = tasks.find_new_inputs(job)
        record["new_files"], record["inputs_gone"] = plan["todo"], plan["gone"]
        if plan["todo"] or (job.prune and plan["gone"]):
            record["restore"] = restore_and_report(job, previews, QUALITY_SAMPLE)
        else:
            logger.info(f"nothing new under {input}: {plan['skipped']} file(s) already restored with "
                        f"{plan['model_version']}")

    if train_challenger or (not record.get("bootstrap") and tasks.training_due(registry, train_every_days)):
        trained = train_flow(train_data, val_data, registry, preset=train_preset, max_minutes=train_minutes,
                             workers=workers, use_gpu=use_gpu)
        record["challenge"] = challenge_flow(trained["model"], registry, val_data, val_noise_sigma, min_gain_db)

    record["champion_after"] = tasks.read_champion(registry)["version"]
    record["record"] = tasks.write_record(output, record)
    create_markdown_artifact(_summary_markdown(record), key="nightly-summary", description="What this night did")
    return record


def _summary_markdown(record: dict) -> str:
    restore = record.get("restore")
    lines = [f"# Nightly run: {len(record['new_files'])} new file(s)", "",
             f"- input `{record['input']}` → output `{record['output']}`",
             f"- champion before: `{record['champion']}`, after: `{record['champion_after']}`"]
    if record.get("inputs_gone"):
        pruned = restore and restore.get("inputs_pruned")
        lines.append(f"- {len(record['inputs_gone'])} input file(s) deleted since an earlier run: "
                     + ("their outputs and records removed" if pruned else "outputs and records kept (`prune` removes them)"))
    if restore:
        lines.append(f"- restored {restore['images_ok']} ok / {restore['images_skipped']} skipped / "
                     f"{restore['images_failed']} failed, "
                     f"{restore['megapixels_per_s']:.3f} MP/s (previews: the `restore-summary` artifact)")
    for key in ("bootstrap", "challenge"):
        if record.get(key):
            decision = record[key]
            lines.append(f"- {key}: `{decision['challenger']}` {'promoted' if decision['promoted'] else 'not promoted'}"
                         f" ({decision['reason']})")
    lines.append(f"- record: `{record['record']}`")
    return "\n".join(lines)


# Written out, not built from flows.FLOW_NAMES: a worker loads this file as a script named
# `flows` (the deployments' entrypoint), where the package's __init__ is not what `flows` is.
# tests/test_layout.py checks that the two lists agree.
FLOWS = {"nightly": nightly_flow, "restore": restore_flow, "train": train_flow, "evaluate": evaluate_flow,
         "challenge": challenge_flow}
