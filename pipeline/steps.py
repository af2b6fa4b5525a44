"""Running a step: any job of pipeline/jobs.py, in this process.

The CLI and the Prefect tasks call `run_step`; in cluster mode a Ray job runs

    python -m pipeline.steps '{"step": "restore", "job": {"input": "s3://...", ...}}'

and speaks the contract of pipeline/jobs.py: JSON-line events on stdout, the result last,
and an exit status that says what kind of failure it was.
"""

from __future__ import annotations

import importlib
import sys

from pipeline.jobs import (
    EXIT_REJECTED,
    EXIT_STATUS,
    Events,
    JsonLinesEvents,
    emit,
    failure_kind,
    job_from_json,
    step_of,
)

USAGE = ("usage: python -m pipeline.steps JOB_JSON\n"
         "  runs one train, evaluate or restore job (pipeline/jobs.py) given as JSON: JSON-line events\n"
         "  on stdout, the result last; exit status 0 done, 2 rejected as given, 75 busy (another run\n"
         "  holds the output), 1 failed")
# Where each step of jobs.STEPS lives: every one exports `run(job, events) -> dict`, its
# result as JSON-ready data. Imported when the step runs, so the CLI starts without torch or Ray.
STEP_MODULES = {"train": "pipeline.train", "evaluate": "pipeline.evaluate", "restore": "pipeline.restore"}


def run_step(job, events: Events | None = None) -> dict:
    """Run a train, evaluate or restore job in this process; returns its result."""
    return importlib.import_module(STEP_MODULES[step_of(job)]).run(job, events or Events())


def main(argv: list[str] | None = None) -> int:
    """The Ray job entry point: one job as JSON in, JSON lines and an exit status out."""
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["--help"], ["-h"]):  # the images' builds check that this entry point starts
        print(USAGE)
        return 0
    if len(argv) != 1:
        print(USAGE, file=sys.stderr)
        return EXIT_REJECTED
    try:
        job = job_from_json(argv[0])
        result = run_step(job, JsonLinesEvents())
    except Exception as error:
        kind = failure_kind(error)
        emit("error", kind=kind, error=type(error).__name__, message=str(error))
        if kind == "failed":
            raise  # the traceback belongs in the job's log
        return EXIT_STATUS[kind]
    emit("result", step=step_of(job), result=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
