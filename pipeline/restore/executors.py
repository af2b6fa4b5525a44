"""Who runs a plan's units: this process, or Ray Data's actor pool of replicas.

A small plan does not pay for a cluster it does not need. Starting local Ray and Ray Data
(its processes, the object store, replicas that each import torch) takes 5-8 s on a
laptop, longer than restoring a few files (bench/README.md, "Against the loop a user would
write"). The step is the same either way: the driver plans, records, assembles and
finishes files alike, and a `UnitRestorer` restores every unit; only where the replica
runs differs. The driver asks `choose_executor`; the replica never knows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

from pipeline import raycluster
from pipeline.jobs import RestoreJob
from pipeline.restore.planning import Unit
from pipeline.restore.records import UnitResult
from pipeline.restore.replica import UnitRestorer

# Rows up to which a plan runs in this process when nothing else decides (a cluster, a GPU,
# a number of replicas asked for): about where Ray's start-up stops showing. On 2 cores a
# BSD68-sized image takes 0.03-0.25 s (the `cpu` preset to DnCNN-S), so 256 rows are
# 8-60 s of work, against Ray's 5-8 s.
IN_PROCESS_MAX_ROWS = 256


def choose_executor(job: RestoreJob, rows: int) -> str:
    """"in-process" or "ray" for a plan of `rows` rows to restore: the job's own choice when
    it makes one; else Ray wherever it is needed or asked for (a cluster's address, GPUs,
    a number of replicas) and for a large plan; this process for a small one."""
    if job.executor != "auto":
        return job.executor
    if os.environ.get("RAY_ADDRESS") or job.use_gpu or job.workers is not None:
        return "ray"
    return "in-process" if rows <= IN_PROCESS_MAX_ROWS else "ray"


class InProcess:
    """One replica in this process with every core: torch's threads for the forward pass
    and as many PNG threads for decoding and encoding, which work while it does not."""

    def __init__(self, job: RestoreJob, model_folder: str, fenced_by: tuple[str, str] | None = None):
        cores = raycluster.physical_cores()
        self.settings = replace(job.settings, device="cpu", threads=job.settings.threads or cores,
                                io_threads=job.settings.io_threads or cores)
        self.replica = UnitRestorer(model_folder, self.settings, job.columns, job.limits, job.input,
                                    fenced_by=fenced_by)

    def results(self, units: list[Unit]) -> Iterator[UnitResult]:
        """Each unit's result as it finishes, in order."""
        for unit in units:
            yield self.replica.restore_unit(unit)
