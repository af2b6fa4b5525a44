"""The step contract: train, evaluate and restore each take one frozen job object.

The CLI parses flags into a job, a Prefect task passes one, and in cluster mode a Ray job
receives one as JSON (pipeline/steps.py runs it). This module is the contract only: the
job types, how they travel as JSON, how a running step reports (`Events`: log lines,
progress; as a Ray job, JSON lines on stdout, `{"resflow_event": ...}`, the last one the
result) and what its exit status means: 2 (rejected: the job as given cannot run, a retry
cannot help), 75 (busy: another run holds the output; retry later), 1 (failed: storage, a
lost node, a stall; a retry may help). The steps import it; it imports none of them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass

from pipeline.config import RestoreSettings, TrainConfig, from_data, setting_names, to_data, with_settings
from pipeline.contract import DecodeLimits, ImageColumns


EXECUTORS = ("auto", "in-process", "ray")  # RestoreJob.executor: who runs a restore (restore/executors.py)


@dataclass(frozen=True)
class RestoreJob:
    input: str  # a dataset: a folder or prefix of Parquet files
    output: str  # where restored files go, at the same relative paths; never equal to, inside or around the input
    model: str  # a model folder, or a registry (its champion)
    settings: RestoreSettings = RestoreSettings()
    limits: DecodeLimits = DecodeLimits()
    columns: ImageColumns = ImageColumns()
    workers: int | None = None  # model replicas; None: one per 2 logical CPUs locally, one per GPU with use_gpu
    use_gpu: bool = False  # one GPU per replica, bf16
    cpus_per_worker: float = 0.5  # logical CPUs a CPU replica reserves; fractions leave Ray's own tasks room
    # Units each replica restores at once, so that one's storage round trips overlap another's
    # work; None: 1 on CPU, 4 on GPU (restore/driver.py). More for a store far away.
    units_per_worker: int | None = None
    force: bool = False  # restore every file, even those the manifest says are done
    prune: bool = False  # remove the outputs, records and staged parts of inputs deleted since an earlier run
    # Rows that failed for a reason that can pass (contract.TRANSIENT) are restored again by up
    # to this many later runs, the file's other rows kept; then they stay failed (--force redoes all).
    retries: int = 2
    stall_timeout_s: float = 600.0  # fail when no row is restored for this long
    lease_wait_s: float = 0.0  # how long to wait for another run's lease on the output before giving up
    lease_ttl_s: float = 120.0  # a crashed run's lease is taken over this long after its last renewal
    lease: bool = True  # False only for a store that ignores conditional writes: nothing keeps two runs apart
    # A unit of work is whole row groups of one file, at most this many rows and this much
    # compressed input (a larger row group is a unit alone): large files spread over replicas.
    unit_rows: int = 256
    unit_megabytes: float = 64.0
    # Who runs the replicas: "auto" lets a small plan run in this process and a large one,
    # or one for a cluster, GPUs or a number of workers, on Ray (pipeline/restore/executors.py).
    executor: str = "auto"

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.units_per_worker is not None and self.units_per_worker < 1:
            raise ValueError("units_per_worker must be >= 1")
        if self.unit_rows < 1 or self.unit_megabytes <= 0:
            raise ValueError("unit_rows must be >= 1 and unit_megabytes positive")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be positive")
        if self.lease_wait_s < 0 or self.lease_ttl_s <= 0:
            raise ValueError("lease_wait_s must be >= 0 and lease_ttl_s positive")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.executor == "in-process" and self.use_gpu:
            raise ValueError("the in-process executor restores on CPU; --gpu runs replicas on Ray")


def restore_setting_names() -> set[str]:
    """Every name `restore_job` takes besides input, output and model."""
    return setting_names(RestoreJob("", "", "")) - {"input", "output", "model"}


def restore_job(input: str, output: str, model: str, **settings) -> RestoreJob:
    """A restore job from settings named by their field (the CLI's flags and the flows'
    parameters are these names): a field of RestoreJob or of the settings it holds
    (RestoreSettings, DecodeLimits, ImageColumns); None leaves the field's own default.
    An unknown name is an error that lists them all."""
    return with_settings(RestoreJob(input=input, output=output, model=model), **settings)


@dataclass(frozen=True)
class EvaluateJob:
    model: str  # a model folder, or a registry (its champion)
    data: str  # paired (image degraded, target clean), or clean with noise_sigma
    noise_sigma: float | None = None  # clean data: the protocol's Gaussian noise at this sigma
    seed: int = 0  # the protocol seeds every image's noise with 0
    settings: RestoreSettings = RestoreSettings()
    limits: DecodeLimits = DecodeLimits()
    columns: ImageColumns = ImageColumns()
    per_image: bool = False  # include every image's scores in the result


@dataclass(frozen=True)
class TrainJob:
    data: str  # clean images, or paired (image degraded, target clean)
    val_data: str  # held out, scored every epoch; picks the published checkpoint
    registry: str  # where the best checkpoint is published as a model version
    config: TrainConfig = TrainConfig()
    run_name: str | None = None  # reuse a name to resume that run from its latest checkpoint


STEPS = {"train": TrainJob, "evaluate": EvaluateJob, "restore": RestoreJob}


def step_of(job) -> str:
    for name, kind in STEPS.items():
        if isinstance(job, kind):
            return name
    raise TypeError(f"not a resflow job: {type(job).__name__}; expected one of {sorted(STEPS)}")


def job_to_json(job) -> str:
    return json.dumps({"step": step_of(job), "job": to_data(job)}, sort_keys=True)


def job_from_json(text: str):
    try:
        data = json.loads(text)
        kind = STEPS[data["step"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"not a resflow job: {error}; expected {{\"step\": one of {sorted(STEPS)}, \"job\": {{...}}}}")
    return from_data(kind, data["job"])


class Events:
    """What a running step reports besides its result. The CLI prints, a Prefect task logs
    and draws a progress artifact, a Ray job writes JSON lines (`JsonLinesEvents`)."""

    interactive = False  # a person watches a terminal: progress bars are welcome

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def progress(self, done: int, total: int) -> None:
        pass


EVENT_KEY = "resflow_event"


class JsonLinesEvents(Events):
    """Events as one JSON object per line on stdout, interleaved with plain log lines."""

    def log(self, message: str) -> None:
        print(message, flush=True)

    def progress(self, done: int, total: int) -> None:
        emit("progress", done=done, total=total)


def emit(event: str, /, **fields) -> None:
    """One event line; positional-only, so that a field may be called `kind` (the error event's)."""
    print(json.dumps({EVENT_KEY: event, **fields}, default=str), flush=True)


def read_event(line: str) -> dict | None:
    """The event a line carries, or None for a plain log line."""
    if not line.startswith('{"' + EVENT_KEY):
        return None
    try:
        return json.loads(line)
    except ValueError:
        return None


# --- what kind of failure: the exit status a caller decides retries by -------------------

EXIT_FAILED, EXIT_REJECTED, EXIT_BUSY = 1, 2, 75


def failure_kind(error: BaseException) -> str:
    """"rejected" (the job as given cannot run: bad schema, bad parameters, overlapping
    paths, a model that does not load), "busy" (another run holds the output), "failed"."""
    from pipeline.lease import LeaseHeld
    from pipeline.modelio import ModelLoadError

    if isinstance(error, LeaseHeld):
        return "busy"
    if isinstance(error, (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError, ModelLoadError)):
        return "rejected"
    return "failed"


EXIT_STATUS = {"failed": EXIT_FAILED, "rejected": EXIT_REJECTED, "busy": EXIT_BUSY}
