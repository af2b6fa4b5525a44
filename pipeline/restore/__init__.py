"""Restoring whole datasets with Ray Data batch inference.

    # laptop: local Ray, CPU replicas, data in the local S3 server
    resflow restore --input s3://resflow/incoming/ --output s3://resflow/restored/ --model s3://resflow/models
    # cluster: RAY_ADDRESS set, one GPU per model replica
    resflow restore --input s3://... --output s3://... --model s3://... --workers 8 --gpu

Read in this order, each file top to bottom:

    records.py    the typed ledgers (manifest entry, part record, a replica's unit result)
    planning.py   which files and units are left to do, and where their outputs go
    replica.py    the model replica Ray Data runs: a unit's row groups in, restored rows out
    executors.py  who runs the replicas: in this process for a small plan, else Ray
    assembly.py   a file restored in several units becomes one output file
    report.py     what a run reports
    driver.py     one run: lease, plan, dispatch, record, assemble, watch for stalls

A rerun restores only files that are new, changed or not done by this model version
under this recipe, and of those only the units not finished; `force` redoes all.
docs/architecture.md draws the path; docs/scaling.md says how far it goes.
"""

from pipeline.restore.driver import StallError, restore_dataset, run
from pipeline.restore.planning import RestorePlan, plan
from pipeline.restore.report import RestoreReport, format_report

__all__ = ["RestorePlan", "RestoreReport", "StallError", "format_report", "plan", "restore_dataset", "run"]
