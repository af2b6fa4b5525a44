"""Who runs a plan's units: this process, or Ray Data's actor pool of replicas.

A small plan does not pay for a cluster it does not need. Starting local Ray and Ray Data
(its processes, the object store, replicas that each import torch) takes 5-8 s on a
laptop, longer than restoring a few files (bench/README.md, "Against the loop a user would
write"). The step is the same either way: the driver plans, records, assembles and
finishes files alike, and a `UnitRestorer` restores every unit; only where the replica
runs differs. The driver asks `choose_executor`; the replica never knows. A large plan
that starts local Ray does not wait for it either: this process restores units while
Ray starts (`HeadStart`).
"""

from __future__ import annotations

import contextvars
import os
import threading
from collections.abc import Callable, Iterator
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


def head_start_wanted(job: RestoreJob, units: int, after_crash: bool) -> bool:
    """Whether this process restores units while Ray starts: where this run starts local
    Ray itself (10-13 s before the first replica's unit on 2 cores, bench/README.md), for
    a CPU job of more than one unit whose executor and replicas were left to resflow
    (`--executor ray` or `--workers N` ask for replicas). A cluster's Ray is already up; a
    GPU job's unit would crawl on the driver's CPU while the GPUs wait for it; and after a
    crashed run (its lease taken over) an image that took the driver down must meet a
    replica instead, which Ray restarts and gives up on."""
    import ray

    return (units > 1 and job.executor == "auto" and job.workers is None and not job.use_gpu and not after_crash
            and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized())


class HeadStart:
    """This process restoring units from the back of the plan, on one core, while local
    Ray and its replicas start and take units from the front, until the first replica
    starts: the first rows arrive after one unit on one core, not after Ray's start-up.
    The first unit is claimed at once, the next ones locally until `attach` and through the
    replicas' `Progress` actor after it, so that a unit is restored here or by a replica,
    never both. Each unit restored here goes to `deliver` from this object's thread; a
    unit whose restore raised waits in `failed` (`failure` says why) for `restore_failed`."""

    def __init__(self, job: RestoreJob, model_folder: str, units: list[Unit], deliver: Callable[[UnitResult], None],
                 fenced_by: tuple[str, str] | None = None):
        import torch

        settings = replace(job.settings, device="cpu", threads=1, io_threads=1)
        self.make_replica = lambda: UnitRestorer(model_folder, settings, job.columns, job.limits, job.input,
                                                 fenced_by=fenced_by)
        self.deliver = deliver
        self.waiting = list(units)
        self.claimed = [self.waiting.pop()]
        self.failed: list[Unit] = []
        self.failure = ""
        self.error: BaseException | None = None
        self.progress = None
        self.replica: UnitRestorer | None = None
        self.torch_threads = torch.get_num_threads()  # the replica sets one for the whole process; put back after
        self.lock = threading.Lock()  # a claim, or attaching the actor
        self.stopped = threading.Event()
        # the caller's context (a Prefect run's, say) goes with the thread, for `deliver`'s logging
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._restore,),
                                       name="resflow-head-start", daemon=True)
        self.thread.start()

    def attach(self, make_progress: Callable[[tuple[str, ...]], object]):
        """The `Progress` actor, made knowing the units claimed so far; later claims ask it."""
        with self.lock:
            self.progress = make_progress(tuple(unit.name for unit in self.claimed))
        return self.progress

    def claimed_all(self) -> bool:
        """Whether every unit is claimed here: the replicas would have nothing to do."""
        with self.lock:
            return not self.waiting

    def stop(self, wait_s: float = 0.0) -> None:
        """Claim nothing more; wait up to `wait_s` for the unit under way."""
        self.stopped.set()
        self.thread.join(wait_s)
        if not self.thread.is_alive():
            import torch

            torch.set_num_threads(self.torch_threads)

    def finish(self, timeout_s: float) -> None:
        """Claim nothing more, wait for the unit under way, and raise what recording or
        claiming raised; TimeoutError when that unit takes longer than `timeout_s`."""
        self.stop(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"the unit this process restored while Ray started took longer than {timeout_s:.0f} s")
        if self.error is not None:
            raise self.error

    def restore_failed(self) -> Iterator[UnitResult]:
        """The units whose restore here raised, restored again here (the replicas passed
        them by); one that raises again ends the run with its error."""
        import torch

        for unit in self.failed:
            self.replica = self.replica or self.make_replica()
            yield self.replica.restore_unit(unit)
        torch.set_num_threads(self.torch_threads)

    def _restore(self) -> None:
        unit = self.claimed[0]
        while unit is not None:
            try:
                self.replica = self.replica or self.make_replica()
                result = self.replica.restore_unit(unit)
            except Exception as error:  # as a lost replica's unit: restored again once the replicas are done
                self.failed.append(unit)
                self.failure = f"{type(error).__name__}: {error}"
                return
            try:
                self.deliver(result)
                unit = self._claim()
            except BaseException as error:  # recording (the lease lost?) or asking Ray: the run's error
                self.error = error
                return

    def _claim(self) -> Unit | None:
        with self.lock:
            if self.stopped.is_set() or not self.waiting:
                return None
            if self.progress is not None:
                import ray

                if not ray.get(self.progress.claim_for_driver.remote(self.waiting[-1].name)):
                    return None  # a replica has started: the head start is over
            self.claimed.append(self.waiting.pop())
            return self.claimed[-1]
