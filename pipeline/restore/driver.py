"""The driver: one restore run holding the output's lease.

It plans (planning.py), hands the units to an actor pool of replicas (replica.py),
records each finished unit of a multi-unit file (`_resflow/units/`) and each finished
file in the manifest (`_resflow/manifest/`), starts the assembly of a multi-unit file
once its last part is done (assembly.py), and watches for a pipeline that stopped moving.
It plans, records and watches; image bytes pass through it only while it restores units
itself as local Ray starts (executors.HeadStart).
"""

from __future__ import annotations

import datetime as dt
import queue
import threading
import time
from dataclasses import asdict, replace

from pipeline import raycluster, storage
from pipeline.config import RestoreSettings
from pipeline.jobs import Events, RestoreJob
from pipeline.lease import LEASE_FILE, NoLease, OutputLease
from pipeline.manifest import Manifest
from pipeline.restore.assembly import ASSEMBLY_CPUS, assemble
from pipeline.restore.executors import HeadStart, InProcess, choose_executor, head_start_wanted
from pipeline.restore.planning import FilePlan, plan
from pipeline.restore.records import FileEntry, PartRecord, UnitResult, output_recipe
from pipeline.restore.replica import Progress, UnitRestorer
from pipeline.restore.report import RestoreReport

# A GPU replica's forward pass outruns one core's PNG work many times over: it decodes and
# encodes on its node's CPUs per GPU but one and restores several units at once, so that
# their reads, writes and PNG work overlap one another's forward passes (bench/README.md).
GPU_UNITS_AT_ONCE = 4
# A CPU replica restores one unit at a time (RestoreJob.units_per_worker): on 2 cores two at
# once, or 3-4 replicas, gained nothing, the cores being busy already, and two units in one
# process contend for the GIL (bench/README.md, "Against the loop"); a store far away may differ.
CPU_UNITS_AT_ONCE = 1
# Units queued at each replica besides those it runs (at least as many as it runs, Ray Data's
# default): the next starts as one ends, not when Ray Data's scheduling loop (up to 100 ms a
# turn) sends it; one queued left each CPU replica waiting for a sixth of a null-model run
# (bench/README.md, "Units queued per replica").
UNITS_QUEUED_PER_REPLICA = 3
GPU_NODE_CPUS_WHEN_NONE_IS_UP = 8  # infra/k8s's GPU workers: the autoscaler starts them on demand
MAX_BLOCKS = 10_000  # Ray Data blocks (a unit each, up to this many; then several units a block)
PROGRESS_POLL_S = 5.0  # how often the driver asks whether rows are still being restored
# The driver records what finished in batches, one PUT every few seconds whatever the files
# per second; a crash loses at most these seconds of records (their files are redone).
RECORD_EVERY_S = 3.0
# A failed run waits this long for the head start's unit under way before it ends; what
# finishes after is committed (fenced by the lease) but never recorded: a rerun redoes it.
HEAD_START_WAIT_S = 10.0


class StallError(RuntimeError):
    """The pipeline delivered no rows for longer than the stall timeout."""


def replica_settings(job: RestoreJob, resources: dict) -> tuple[int, RestoreSettings, dict, int]:
    """How many replicas, the settings each runs with, its Ray resources, and how many
    units it restores at once: derived from the job and what the cluster offers."""
    workers = job.workers or (max(1, int(resources.get("GPU", 1))) if job.use_gpu
                              else max(1, int(resources.get("CPU", 2) // 2)))
    if job.use_gpu:
        io_threads = job.settings.io_threads or max(1, (raycluster.cpus_per_gpu() or GPU_NODE_CPUS_WHEN_NONE_IS_UP) - 1)
        settings = replace(job.settings, device="cuda", io_threads=io_threads)
        return workers, settings, {"num_gpus": 1, "num_cpus": io_threads}, job.units_per_worker or GPU_UNITS_AT_ONCE
    # one torch thread per core; as many PNG threads, which work while the forward pass does not
    threads = job.settings.threads or max(1, raycluster.physical_cores() // workers)
    settings = replace(job.settings, device="cpu", threads=threads, io_threads=job.settings.io_threads or threads)
    return workers, settings, {"num_cpus": job.cpus_per_worker}, job.units_per_worker or CPU_UNITS_AT_ONCE


def batches_with_watchdog(dataset, stall_timeout_s: float, where, rows_restored=lambda: -1):
    """Iterate the dataset in a thread; raise StallError when for `stall_timeout_s` neither a
    result arrives nor `rows_restored()` (polled every PROGRESS_POLL_S while waiting) grows.
    Leaving early (a stall, an error) tells the thread to close the iterator, which shuts
    Ray Data's execution down once the thread wakes."""
    channel: queue.Queue = queue.Queue(maxsize=2)
    finished = object()
    stop = threading.Event()

    def pump():
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                if stop.is_set():
                    return
                channel.put(batch)
            channel.put(finished)
        except BaseException as error:  # surfaces in the caller
            channel.put(error)

    thread = threading.Thread(target=pump, name="resflow-restore-results", daemon=True)
    thread.start()
    last_progress, last_rows = time.monotonic(), rows_restored()
    try:
        while True:
            try:
                item = channel.get(timeout=min(stall_timeout_s, PROGRESS_POLL_S))
            except queue.Empty:
                rows = rows_restored()
                if rows > last_rows:
                    last_progress, last_rows = time.monotonic(), rows
                elif time.monotonic() - last_progress >= stall_timeout_s:
                    raise StallError(f"no restored rows for {stall_timeout_s:.0f} s: {where()}. The pipeline is "
                                     f"stuck (a lost node, a hung storage call?); this run is abandoned, finished "
                                     f"files and units are kept, and a rerun restores the rest") from None
                continue
            if item is finished:
                return
            if isinstance(item, BaseException):
                raise item
            last_progress = time.monotonic()
            yield item
    finally:
        stop.set()
        while not channel.empty():  # unblock a pump waiting on a full queue
            channel.get_nowait()


def prune_inputs_gone(job: RestoreJob, gone: list[str], gone_units: list[str]) -> int:
    """Remove what is left of inputs deleted since an earlier run: the output file, its
    manifest entry, its unit records and its staged parts (the caller holds the lease).
    Keys come from stored records, so nothing outside the output is touched, and an output
    is deleted only while it is still exactly what the manifest recorded."""
    entries = Manifest(job.output, "manifest").all()
    parts_root = storage.join(job.output, storage.RESFLOW_DIR, "parts")
    for key in gone:
        entry = FileEntry.from_json(entries.get(key))
        if entry is not None and _strictly_inside(job.output, entry.output):
            storage.delete_if_match(entry.output, entry.output_etag)
        if _strictly_inside(parts_root, storage.join(parts_root, key)):
            storage.delete(storage.join(parts_root, key))
    Manifest(job.output, "manifest").put_many(dict.fromkeys(gone))
    Manifest(job.output, "units").put_many(dict.fromkeys(gone_units))
    return len(gone)


def _strictly_inside(folder: str, uri: str) -> bool:
    return storage.contains(folder, uri) and not storage.contains(uri, folder)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Run:
    """One restore run holding the output's lease: plan, dispatch units, record what
    finishes, assemble multi-unit files, watch for stalls."""

    def __init__(self, job: RestoreJob, lease: OutputLease, events: Events):
        self.job, self.lease, self.events = job, lease, events
        self.recipe = output_recipe(job)
        self.manifest = Manifest(job.output, "manifest")
        self.units_manifest = Manifest(job.output, "units")
        self.unrecorded: dict[str, dict] = {"manifest": {}, "units": {}}  # records not yet stored
        self.progress = None  # on Ray: rows restored, attempts and the head start's units (replica.Progress)
        self.assemble_task = None  # on Ray: assembly as a Ray task
        self.assembling: dict = {}  # on Ray: object ref -> file key
        self.recorded_at = time.monotonic()
        self.started = time.time()
        self.recording = threading.RLock()  # the head start's thread records too (executors.HeadStart)
        self.closed = False

    def execute(self) -> RestoreReport:
        job, events = self.job, self.events
        cleared = storage.clear_temporaries(job.output, keep=(f".{LEASE_FILE}.",))  # the lease's own renewals stay
        if cleared:
            events.log(f"removed {len(cleared)} temporary file(s) that killed writers left under {job.output}")
        planned = plan(job)
        for damaged in planned.damaged:
            events.log(f"unreadable record {damaged}: the work it recorded is done again, and the record replaced")
        self.files = {file.key: file for file in planned.files}
        report = self.report = RestoreReport(job.output, planned.model_version,
                                             files_total=len(planned.files) + len(planned.skipped),
                                             files_skipped=len(planned.skipped))
        report.inputs_gone = planned.gone
        report.retries_spent = planned.retries_spent
        if planned.gone and job.prune:
            self.lease.confirm()
            report.inputs_pruned = prune_inputs_gone(job, planned.gone, planned.gone_units)
            events.log(f"pruned {report.inputs_pruned} deleted input(s): their outputs, records and parts")
        elif planned.gone:
            events.log(f"{len(planned.gone)} input file(s) deleted since an earlier run still have outputs or "
                       f"records (e.g. {planned.gone[0]}); --prune removes them")
        if not planned.files:
            events.log(f"nothing to restore: all {len(planned.skipped)} input file(s) are done for model "
                       f"{planned.model_version}")
            report.seconds = time.time() - self.started
            return report
        pending = [unit for file in planned.files for unit in file.units if unit.index not in file.done]
        report.units_skipped = sum(len(file.done) for file in planned.files)
        report.images_total = sum(unit.rows_to_restore for unit in pending)
        report.executor = choose_executor(job, report.images_total)
        try:
            if report.executor == "in-process":
                self._restore_here(planned, pending)
            else:
                self._restore_on_ray(planned, pending)
        finally:
            self._close()
        if report.files_restored != len(planned.files):
            raise RuntimeError(f"restore ended early: {report.files_restored} of {len(planned.files)} file(s) "
                               f"complete; rerun to finish (done files and units are skipped)")
        report.seconds = time.time() - self.started
        return report

    def _restore_here(self, planned, pending: list) -> None:
        """The replica in this process (a small plan): no Ray, no watchdog (nothing runs
        out of sight), multi-unit files assembled as their last unit finishes."""
        job, events, report = self.job, self.events, self.report
        local = InProcess(job, planned.model_folder, self._fenced_by())
        events.progress(0, report.images_total)
        events.log(f"restoring {len(planned.files)} file(s) in {len(pending)} unit(s) ({report.units_skipped} "
                   f"already done), {report.images_total} images, with model {planned.model_version} in this "
                   f"process ({local.settings.threads} torch thread(s), {local.settings.io_threads} PNG thread(s), "
                   f"{local.settings.rows_per_forward} image(s) per forward pass): a plan this small does not "
                   f"need Ray; {len(planned.skipped)} file(s) already done")
        for file in planned.files:  # every unit done by an earlier run: only the assembly is left
            if file.units and len(file.done) == len(file.units):
                self._assemble(file)
        for result in local.results(pending):
            report.first_rows_seconds = report.first_rows_seconds or time.time() - self.started
            self._record(result)
            self._store_records()

    def _restore_on_ray(self, planned, pending: list) -> None:
        """Ray Data's actor pool of replicas, watched for stalls; where this run starts local
        Ray, this process restores units from the back of the plan meanwhile (HeadStart)."""
        job, events, report = self.job, self.events, self.report
        events.progress(0, report.images_total)
        head = None
        if head_start_wanted(job, len(pending), after_crash=self.lease.took_over):
            events.log("starting local Ray; restoring units in this process meanwhile")
            head = HeadStart(job, planned.model_folder, pending, self._record_head_start, self._fenced_by())
        try:
            self._restore_on_replicas(planned, pending, head)
        except BaseException:
            if head is not None:  # what it still finishes is left out of the records (`closed`): redone by a rerun
                head.stop(wait_s=HEAD_START_WAIT_S)
            raise
        if head is not None:
            try:
                head.finish(timeout_s=job.stall_timeout_s)
            except TimeoutError as error:
                raise StallError(f"{error}: {self._where()}; this run is abandoned, finished files and units are "
                                 f"kept, and a rerun restores the rest") from None
            report.units_head_start = len(head.claimed)
            if head.failed:
                events.log(f"{len(head.failed)} unit(s) failed in this process while Ray started ({head.failure}); "
                           f"restoring them again")
            for result in head.restore_failed():
                self._record_head_start(result)
        with self.recording:
            self._collect_assemblies(timeout=job.stall_timeout_s, all_of_them=True)

    def _record_head_start(self, result: UnitResult) -> None:
        """A unit the head start restored (its thread): recorded as a replica's."""
        with self.recording:
            if self.closed:
                return  # the run ended early: the unit is redone by a rerun
            self.report.first_rows_seconds = self.report.first_rows_seconds or time.time() - self.started
            self._record(result)
            self._store_records()

    def _restore_on_replicas(self, planned, pending: list, head: HeadStart | None) -> None:
        """Every pending unit to the actor pool, which passes by those the head start claimed."""
        import ray
        import ray.data
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        job, events, report = self.job, self.events, self.report
        workers, settings, actor_options, units_at_once = replica_settings(job, raycluster.connect())
        queued = max(UNITS_QUEUED_PER_REPLICA, units_at_once)
        ray.data.DataContext.get_current().enable_progress_bars = events.interactive
        # On this process's node: the run needs it to the end, and a worker node may be lost
        # mid-run (or be dead and not yet noticed when a rerun starts); this node ends with the run.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        make_progress = ray.remote(num_cpus=0, scheduling_strategy=here)(Progress).remote
        self.progress = head.attach(make_progress) if head is not None else make_progress()
        self.assemble_task = ray.remote(num_cpus=ASSEMBLY_CPUS)(assemble)
        with self.recording:
            for file in planned.files:  # every unit done by an earlier run: only the assembly is left
                if file.units and len(file.done) == len(file.units):
                    self._assemble(file)
        if head is not None and head.claimed_all():
            events.log(f"all {len(pending)} unit(s) were taken by this process while Ray started")
            return
        events.log(f"restoring {len(planned.files)} file(s) in {len(pending)} unit(s) ({report.units_skipped} "
                   f"already done), {report.images_total} images, with model {planned.model_version} on {workers} "
                   f"{'GPU' if job.use_gpu else 'CPU'} replica(s) ({settings.rows_per_call} rows per call, "
                   f"{settings.rows_per_forward} per forward pass, "
                   f"{settings.io_threads or 1} PNG thread(s), {units_at_once} unit(s) at once each, {queued} queued); "
                   f"{len(planned.skipped)} file(s) already done")
        if len(pending) < workers:
            events.log(f"note: {len(pending)} unit(s) for {workers} replicas: {workers - len(pending)} will idle; "
                       f"smaller units (unit_rows) spread a few files over more replicas")
        if pending:
            restored = ray.data.from_items([asdict(unit) for unit in pending],
                                           override_num_blocks=min(len(pending), MAX_BLOCKS)).map_batches(
                UnitRestorer,
                fn_constructor_kwargs={"model_uri": planned.model_folder, "settings": settings,
                                       "columns": job.columns, "limits": job.limits, "base_dir": job.input,
                                       "progress": self.progress, "fenced_by": self._fenced_by()},
                batch_size=1, batch_format="pyarrow",
                # every replica starts at once (model loads overlap one another); the pool may
                # shrink to one when a node is lost, and Ray Data gives its units to another
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers, initial_size=workers,
                                                   max_concurrent_calls_per_actor=units_at_once,
                                                   max_tasks_in_flight_per_actor=units_at_once + queued,
                                                   enable_true_multi_threading=units_at_once > 1),
                **actor_options,
            )
            for batch in batches_with_watchdog(restored, job.stall_timeout_s, self._where, self._rows_restored):
                with self.recording:
                    if batch.num_rows:  # none: units the head start restored, passed by
                        report.first_rows_seconds = report.first_rows_seconds or time.time() - self.started
                    for row in batch.to_pylist():
                        self._record(UnitResult.from_row(row))
                    self._collect_assemblies(timeout=0)
                    self._store_records()

    def _close(self) -> None:
        """Whatever ended the run: store what finished, note the units retried, fold the manifests."""
        with self.recording:
            self.closed = True  # a head start still under way records nothing more
            try:
                self._store_records(now=True)
            except Exception as error:
                self.events.log(f"could not record the last finished work ({error}); a rerun redoes it")
        if self.progress is not None:  # on Ray
            import ray

            try:
                attempts = ray.get(self.progress.attempts_of.remote(), timeout=PROGRESS_POLL_S)
                self.report.units_retried = sorted(unit for unit, count in attempts.items() if count > 1)
            except Exception:  # statistics only
                pass
            ray.kill(self.progress)
        for manifest in (self.manifest, self.units_manifest):
            try:
                self.lease.confirm()
                manifest.compact()
            except Exception as error:  # entries stay valid one by one; never mask the run's own error
                self.events.log(f"{manifest.kind} not compacted ({error}); the next run reads its entries one by one")

    def _fenced_by(self) -> tuple[str, str] | None:
        """What a replica checks before it commits a unit: that this run still holds the lease."""
        run = self.lease.holder["run"]
        return (self.job.output, run) if run else None

    def _rows_restored(self) -> int:
        import ray

        if self.progress is None:
            return -1
        try:
            return ray.get(self.progress.total.remote(), timeout=PROGRESS_POLL_S)
        except Exception:  # an unreachable counter proves nothing either way
            return -1

    def _where(self) -> str:
        report = self.report
        return (f"{report.files_restored}/{len(self.files)} file(s) and {report.units_restored} unit(s) written, "
                f"{report.images_done} rows in them; the replicas last reported "
                f"{max(self._rows_restored(), 0)} rows restored")

    def _record(self, result: UnitResult) -> None:
        """A unit finished: count it, record it, and finish its file when it was the last."""
        file = self.files[result.key]
        unit = file.units[result.index]
        if result.rows != unit.rows:
            raise RuntimeError(f"{file.info.uri} row groups {unit.first}-{unit.last} had {unit.rows} rows when "
                               f"planned and {result.rows} when restored: it changed during the run; rerun")
        self.report.add(result)
        if unit.heal_rows:
            self.report.files_retried += 1
            self.report.images_retried += unit.heal_rows
        if unit.count == 1:
            self._finish(file, result.output_etag, result.output_size, [result])
        else:
            file.done[unit.index] = PartRecord(
                part=unit.target, part_etag=result.output_etag, input_etag=file.info.etag,
                model_version=self.report.model_version, recipe=self.recipe,
                rows=result.rows, ok=result.ok, failed=result.failed, skipped=result.skipped, transient=result.transient)
            self.unrecorded["units"][unit.name] = file.done[unit.index].to_json()
            if len(file.done) == len(file.units):
                self._assemble(file)
        self.events.progress(self.report.images_done, self.report.images_total)

    def _assemble(self, file: FilePlan) -> None:
        parts = [unit.target for unit in file.units]
        self.lease.confirm()  # an assembly writes the output file itself: only while the lease is ours
        if self.assemble_task is None:  # in this process: now
            self._assembled(file, assemble(parts, file.output))
        else:
            self.assembling[self.assemble_task.remote(parts, file.output)] = file.key

    def _collect_assemblies(self, timeout: float, all_of_them: bool = False) -> None:
        import ray

        deadline = time.monotonic() + timeout
        while self.assembling:
            left = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(self.assembling), num_returns=1, timeout=left if all_of_them else 0)
            if not ready:
                if all_of_them:
                    raise StallError(f"assembling {len(self.assembling)} file(s) took longer than {timeout:.0f} s: "
                                     f"{self._where()}; finished units are kept, and a rerun assembles them")
                return
            self._assembled(self.files[self.assembling.pop(ready[0])], ray.get(ready[0]))

    def _assembled(self, file: FilePlan, stored) -> None:
        """A multi-unit file's output is whole: finish it, forget and delete its parts."""
        self._finish(file, stored.etag, stored.size, list(file.done.values()))
        for unit in file.units:  # the parts are in the output now; their records and bytes can go
            self.unrecorded["units"][unit.name] = None
            try:
                storage.delete(unit.target)
            except Exception as error:  # leftovers are skipped by readers and overwritten by reruns
                self.events.log(f"could not clean up {unit.target}: {error}")

    def _finish(self, file: FilePlan, output_etag: str, output_size: int, units: list) -> None:
        """A file's output is whole: record it in the manifest (`units`: its units' counts,
        or a retry's, whose counts are only of the rows it restored again)."""
        rows = sum(unit.rows for unit in units)
        if rows != file.rows:
            raise RuntimeError(f"{file.info.uri} had {file.rows} rows when planned and {rows} in its "
                               f"output: it changed during the run; rerun to restore it again")
        counts = {name: sum(getattr(unit, name) for unit in units) for name in ("ok", "failed", "skipped", "transient")}
        earlier = file.earlier
        if earlier is not None:  # a retry: its rows restored again replace earlier failed ones
            counts = {"ok": earlier.ok + counts["ok"], "skipped": earlier.skipped + counts["skipped"],
                      "failed": earlier.failed - earlier.transient + counts["failed"], "transient": counts["transient"]}
        entry = FileEntry(
            input=file.info.uri, input_etag=file.info.etag, input_size=file.info.size,
            output=file.output, output_etag=output_etag, output_size=output_size,
            model_version=self.report.model_version, recipe=self.recipe, rows=rows, **counts, finished=_now(),
            parts=earlier.parts if earlier else len(file.units), attempts=earlier.attempts + 1 if earlier else 1)
        self.unrecorded["manifest"][file.key] = entry.to_json()
        self.report.files_restored += 1
        self.report.outputs.append(file.output)

    def _store_records(self, now: bool = False) -> None:
        """Store what finished since the last time, one batch per manifest, every
        RECORD_EVERY_S seconds (or `now`); never once another run may own the output."""
        if not now and time.monotonic() - self.recorded_at < RECORD_EVERY_S:
            return
        if any(self.unrecorded.values()):
            self.lease.confirm()  # the store says the lease is still ours, not only the local clock
            self.manifest.put_many(self.unrecorded["manifest"])  # files first: a crash in between redoes less
            self.units_manifest.put_many(self.unrecorded["units"])
            self.unrecorded = {"manifest": {}, "units": {}}
        self.recorded_at = time.monotonic()


def restore_dataset(job: RestoreJob, events: Events | None = None) -> RestoreReport:
    """Restore every new or changed input file; `events` hears log lines and progress
    (images done of images to restore). A small plan runs in this process; a large one
    starts local Ray when none is connected (executors.choose_executor, raycluster.connect).

    The run holds the output's lease (pipeline/lease.py) from before planning to the end,
    so a second run on the same output waits or stops instead of writing beside it."""
    events = events or Events()
    storage.check_disjoint(job.input, job.output)  # before the lease, which writes under the output
    lease = (OutputLease(job.output, ttl_s=job.lease_ttl_s, wait_s=job.lease_wait_s, log=events.log) if job.lease
             else NoLease(job.output, log=events.log))
    with lease:
        return Run(job, lease, events).execute()


def run(job: RestoreJob, events: Events) -> dict:
    """The step contract (pipeline/steps.py): the report as JSON-ready data."""
    return restore_dataset(job, events).to_dict()
