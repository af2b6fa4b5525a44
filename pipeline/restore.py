"""Restoring whole datasets with Ray Data batch inference.

    # laptop: local Ray, CPU actors, data in the local S3 server
    resflow restore --input s3://resflow/incoming/ --output s3://resflow/restored/ --model s3://resflow/models
    # cluster: RAY_ADDRESS set, one GPU per model replica
    resflow restore --input s3://... --output s3://... --model s3://... --workers 8 --gpu --batch-size 16

Read (Ray Data, Parquet from object storage) -> restore in an actor pool of model
replicas (`ImageRestorer`: decode, tiled forward, encode) -> the driver collects the
results of one input file at a time, publishes its output file atomically when the last
row arrives, then records it in the manifest (`_resflow/manifest/`). Memory is bounded by
Ray Data's streaming backpressure plus one file's restored rows.

A rerun restores only input files that are new, changed (ETag/size) or were restored by
another model version; `--force` redoes all. A run that makes no progress for
`stall_timeout_s` fails with a message saying where it stalled; the rerun completes it.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import queue
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from pipeline import raycluster, registry, storage
from pipeline.dataset import Manifest, inspect_dataset, write_table
from pipeline.images import DecodeLimits, ImageColumns
from pipeline.modelio import load_model
from pipeline.restore_core import RestoreSettings

SOURCE_COLUMN = "path"  # Ray Data's include_paths column: the input file of each row, dropped before writing
# Rows per model call when the job does not say. On CPU, larger batches are slower: the
# activations of 8 BSD68-sized images leave the cache (cpu preset, one thread: 0.73 MP/s
# at 4 rows, 0.52 at 8; two threads: 1.29 vs 0.91). GPUs want more rows per call (H200,
# DnCNN-S, bf16: 105 / 114 / 119 / 127 MP/s at 4 / 8 / 16 / 32 rows); 16 keeps two calls
# in flight per replica without large batches of large tiles.
CPU_BATCH_SIZE = 4
GPU_BATCH_SIZE = 16
# A GPU replica's forward pass outruns one core's PNG decoding and encoding many times over
# (H200, DnCNN-S in bf16: ~120 MP/s at 16 rows per call; one core decodes and encodes under
# 10 MP/s): it decodes and encodes on half of its node's CPUs per GPU (the other half read),
# runs two calls at once so that one's PNG work overlaps the other's forward, and is fed by
# several read tasks (one read ~50 files/s from a local S3 server here).
GPU_CALLS_AT_ONCE = 2
GPU_READ_TASKS_PER_REPLICA = 4
GPU_NODE_CPUS_WHEN_NONE_IS_UP = 8  # infra/kuberay's GPU workers: the autoscaler starts them on demand


class StallError(RuntimeError):
    """The pipeline delivered no rows for longer than the stall timeout."""


@dataclass(frozen=True)
class RestoreJob:
    input: str
    output: str
    model: str  # a model folder, or a registry (its champion)
    workers: int | None = None  # model replicas; None: one per 2 logical CPUs locally, one per GPU with use_gpu
    use_gpu: bool = False  # one GPU per replica, bf16
    cpus_per_worker: float = 0.5  # logical CPUs a replica reserves; fractions keep reads and writes running
    batch_size: int | None = None  # rows per model call (tiles of one size are batched); None: per device, above
    io_threads: int | None = None  # PNG decode/encode threads per replica; None: 1 on CPU, per GPU node on GPU (above)
    read_tasks: int | None = None  # Parquet read tasks at once; None: 1 per CPU replica, 4 per GPU replica
    tile: int = 512
    tile_overlap: int = 64
    force: bool = False  # restore every file, even those the manifest says are done
    stall_timeout_s: float = 600.0  # fail when no row arrives for this long
    columns: ImageColumns = ImageColumns()
    progress: bool = True

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ValueError("workers must be >= 1")
        for name in ("io_threads", "read_tasks"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be positive")
        RestoreSettings(tile=self.tile, tile_overlap=self.tile_overlap, batch_size=self.rows_per_call)

    @property
    def rows_per_call(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return GPU_BATCH_SIZE if self.use_gpu else CPU_BATCH_SIZE


@dataclass
class RestoreReport:
    output: str
    model_version: str
    files_total: int = 0
    files_restored: int = 0
    files_skipped: int = 0
    images_total: int = 0  # rows in the files to restore this run
    images_ok: int = 0
    images_failed: int = 0
    megapixels: float = 0.0
    seconds: float = 0.0
    first_rows_seconds: float = 0.0  # start-up: planning, Ray Data and model replicas until the first restored rows
    failures: list = field(default_factory=list)  # first few (image_id, reason)
    outputs: list = field(default_factory=list)

    @property
    def megapixels_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "megapixels_per_s": self.megapixels_per_s}


def output_uri(job: RestoreJob, input_info: storage.FileInfo) -> str:
    """Same relative path (so the same base name) under the output prefix."""
    relative = posixpath.relpath(storage.parse(input_info.uri).path, storage.parse(job.input).path)
    if relative == ".":
        relative = storage.parse(input_info.uri).name
    return storage.join(job.output, relative)


@dataclass
class RestorePlan:
    todo: list[storage.FileInfo]  # new, changed, or restored by another model version (all with force)
    skipped: list[storage.FileInfo]  # done for this model version
    model_folder: str
    model_version: str
    rows: dict[str, int]  # rows per input file to restore, from the footers


def plan(job: RestoreJob) -> RestorePlan:
    """Check everything that can be checked before any work: the model loads (safetensors,
    architecture), the input is non-empty and every file has the contract's columns."""
    model_folder = registry.resolve(job.model)
    _, card = load_model(model_folder)
    inspected = inspect_dataset(job.input, job.columns)
    for info, footer in inspected:
        if SOURCE_COLUMN in footer.schema.to_arrow_schema().names:  # top-level columns, not nested fields
            raise ValueError(f"{info.uri} has a column named {SOURCE_COLUMN!r}, which Ray Data's reader uses for the "
                             f"source file of each row; rename it (e.g. to source_path) before restoring")
    manifest = Manifest(job.output, "manifest")
    done = manifest.all()
    todo, skipped = [], []
    for info, _ in inspected:
        entry = done.get(_manifest_key(job, info))
        up_to_date = (entry and entry.get("input_etag") == info.etag and entry.get("input_size") == info.size
                      and entry.get("model_version") == card.version)
        (skipped if up_to_date and not job.force else todo).append(info)
    wanted = {info.uri for info in todo}
    rows = {info.uri: footer.num_rows for info, footer in inspected if info.uri in wanted}
    return RestorePlan(todo, skipped, model_folder, card.version, rows)


def _manifest_key(job: RestoreJob, info: storage.FileInfo) -> str:
    return posixpath.relpath(storage.parse(output_uri(job, info)).path, storage.parse(job.output).path)


class _FileWriter:
    """Collects the restored rows of one input file (they arrive in order, one file at a
    time) and publishes the output file atomically once the last row is in."""

    def __init__(self, job: RestoreJob, info: storage.FileInfo, expected_rows: int):
        self.job, self.info, self.expected = job, info, expected_rows
        self.rows = self.ok = self.failed = 0
        self.uri = output_uri(job, info)
        self.tables: list[pa.Table] = []

    def add(self, table: pa.Table) -> None:
        self.tables.append(table)
        self.rows += table.num_rows
        status = table.column("status").to_pylist()
        self.ok += status.count("ok")
        self.failed += status.count("failed")

    @property
    def complete(self) -> bool:
        return self.rows >= self.expected

    def publish(self) -> None:
        table = pa.concat_tables(self.tables, promote_options="permissive") if self.tables else None
        if table is None or table.num_rows != self.expected:
            raise RuntimeError(f"{self.info.uri}: expected {self.expected} rows, got {0 if table is None else table.num_rows}")

        typed = {self.job.columns.image: pa.binary(), "status": pa.string(), "error": pa.string(),
                 "model_version": pa.string()}
        for name, kind in typed.items():  # an all-null block comes back as type null
            position = table.schema.get_field_index(name)
            table = table.set_column(position, name, table.column(name).cast(kind))

        write_table(self.uri, table)


def restore_dataset(job: RestoreJob, log=print, on_progress=None, ray_dashboard: bool = True) -> RestoreReport:
    """Restore every new or changed input file. `on_progress(images_done, images_total)` is
    called after each published output file (orchestrators draw progress from it).
    `ray_dashboard=False` starts local Ray (when this call starts it) without its dashboard:
    `resflow restore`, a process of its own, saves ~210 MB and 10 processes
    (raycluster.connect); a process that trains later (the nightly flow) needs it."""
    import ray
    import ray.data

    started = time.time()
    planned = plan(job)
    todo, skipped, model_version, expected = planned.todo, planned.skipped, planned.model_version, planned.rows
    report = RestoreReport(job.output, model_version, files_total=len(todo) + len(skipped), files_skipped=len(skipped))
    if not todo:
        log(f"nothing to restore: all {len(skipped)} input file(s) are done for model {model_version}")
        report.seconds = time.time() - started
        return report
    storage.ensure_bucket(job.output)
    resources = raycluster.connect(dashboard=ray_dashboard)
    workers = job.workers or (max(1, int(resources.get("GPU", 1))) if job.use_gpu
                              else max(1, int(resources.get("CPU", 2) // 2)))
    if job.use_gpu:
        threads = None
        io_threads = job.io_threads or max(1, (raycluster.cpus_per_gpu() or GPU_NODE_CPUS_WHEN_NONE_IS_UP) // 2)
        actor_options = {"num_gpus": 1, "num_cpus": io_threads}
        calls_at_once, read_tasks = GPU_CALLS_AT_ONCE, job.read_tasks or GPU_READ_TASKS_PER_REPLICA * workers
    else:
        threads, io_threads = max(1, raycluster.physical_cores() // workers), job.io_threads or 1
        actor_options = {"num_cpus": job.cpus_per_worker}
        calls_at_once, read_tasks = 1, job.read_tasks or workers
    settings = RestoreSettings(tile=job.tile, tile_overlap=job.tile_overlap, batch_size=job.rows_per_call,
                               device="cuda" if job.use_gpu else "cpu", threads=threads, io_threads=io_threads)

    report.images_total = sum(expected.values())
    if on_progress:
        on_progress(0, report.images_total)
    log(f"restoring {len(todo)} file(s), {sum(expected.values())} images, with model {model_version} on "
        f"{workers} {'GPU' if job.use_gpu else 'CPU'} replica(s) ({job.rows_per_call} rows per call, "
        f"{io_threads} PNG thread(s) each, {read_tasks} read task(s)); {len(skipped)} file(s) already done")

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows of one file arrive together, in input order
    context.enable_progress_bars = job.progress
    filesystem, _ = storage.pyarrow_filesystem(todo[0].uri)
    uri_of_path = {storage.parse(info.uri).path: info.uri for info in todo}
    # One read over all files (a union of per-file reads schedules badly: 8x slower here);
    # include_paths tags each row with its file, which is how rows find their output file.
    # A bounded number of read tasks (one per CPU replica): reads keep up with restoration,
    # and memory does not grow with the number of files that could be read at once.
    dataset = ray.data.read_parquet(list(uri_of_path), filesystem=filesystem, include_paths=True,
                                    concurrency=read_tasks)
    # That limit is a cap: a small input arrives as one listing block and needs one read
    # task, which Ray Data reports as a warning in every small job's log.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for 'ReadFiles",
                            category=UserWarning)
    # The reader packs small files into one block and keeps a large file whole: cut blocks
    # to one batch so that rows spread over the replicas.
    dataset = dataset.repartition(target_num_rows_per_block=job.rows_per_call)
    from pipeline.restore_core import ImageRestorer

    restored = dataset.map_batches(
        ImageRestorer,
        fn_constructor_kwargs={"model_uri": planned.model_folder, "settings": settings, "columns": job.columns,
                               "limits": DecodeLimits(), "base_dir": job.input},
        batch_size=job.rows_per_call, batch_format="numpy",
        # Every replica starts at once (model loads overlap the first reads); the pool may
        # shrink to one when a node is lost.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers, initial_size=workers,
                                           max_concurrent_calls_per_actor=calls_at_once,
                                           enable_true_multi_threading=calls_at_once > 1),
        **actor_options,
    )

    manifest = Manifest(job.output, "manifest")
    by_uri = {info.uri: info for info in todo}
    writer: _FileWriter | None = None
    for batch in _batches_with_watchdog(restored, job.stall_timeout_s, lambda: _where(report, writer, expected)):
        report.first_rows_seconds = report.first_rows_seconds or time.time() - started
        for source_path, part in _split_by_source(batch):
            source = uri_of_path[source_path]
            if writer is None or writer.info.uri != source:
                if writer is not None:
                    raise RuntimeError(f"rows of {source} arrived before {writer.info.uri} was complete")
                writer = _FileWriter(job, by_uri[source], expected[source])
            writer.add(part)
            if writer.complete:
                writer.publish()
                manifest.put(_manifest_key(job, writer.info), {
                    "input": writer.info.uri, "input_etag": writer.info.etag, "input_size": writer.info.size,
                    "output": writer.uri, "model_version": model_version, "rows": writer.rows, "ok": writer.ok,
                    "failed": writer.failed, "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                })
                report.files_restored += 1
                report.images_ok += writer.ok
                report.images_failed += writer.failed
                report.outputs.append(writer.uri)
                writer = None
                if on_progress:
                    on_progress(report.images_ok + report.images_failed, report.images_total)
            report.megapixels += _megapixels(part, job.columns.image)
            if len(report.failures) < 20:
                for image_id, status, error in zip(part.column(job.columns.id).to_pylist(),
                                                   part.column("status").to_pylist(), part.column("error").to_pylist()):
                    if status == "failed" and len(report.failures) < 20:
                        report.failures.append((image_id, error))
    if writer is not None or report.files_restored != len(todo):
        raise RuntimeError(f"restore ended early: {report.files_restored} of {len(todo)} file(s) complete; "
                           f"rerun to finish (done files are skipped)")
    report.seconds = time.time() - started
    return report


def _split_by_source(batch: dict) -> list[tuple[str, pa.Table]]:
    """Consecutive runs of rows from the same input file, as tables without the tag column."""
    table = batch if isinstance(batch, pa.Table) else pa.table(batch)
    sources = table.column(SOURCE_COLUMN).to_pylist()
    table = table.drop_columns([SOURCE_COLUMN])
    runs, start = [], 0
    for index in range(1, len(sources) + 1):
        if index == len(sources) or sources[index] != sources[start]:
            runs.append((sources[start], table.slice(start, index - start)))
            start = index
    return runs


def _megapixels(table: pa.Table, image_column: str) -> float:
    # Read from the PNG header (width and height at bytes 16-24) rather than decoding again.
    total = 0
    for value in table.column(image_column).to_pylist():
        if value and len(value) >= 24:
            total += int.from_bytes(value[16:20], "big") * int.from_bytes(value[20:24], "big")
    return total / 1e6


def _where(report: RestoreReport, writer, expected: dict) -> str:
    current = f"{writer.info.uri} at row {writer.rows}/{writer.expected}" if writer else "the next file"
    return (f"{report.files_restored}/{len(expected)} file(s) written, {report.images_ok + report.images_failed} rows "
            f"done; waiting for {current}")


def _batches_with_watchdog(dataset, stall_timeout_s: float, where):
    """Iterate the dataset in a thread; raise StallError when nothing arrives for too long.
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
    try:
        while True:
            try:
                item = channel.get(timeout=stall_timeout_s)
            except queue.Empty:
                raise StallError(f"no restored rows for {stall_timeout_s:.0f} s: {where()}. The pipeline is stuck (a "
                                 f"lost node, a hung storage call?); this run is abandoned, finished files are kept, "
                                 f"and a rerun restores the rest") from None
            if item is finished:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while not channel.empty():  # unblock a pump waiting on a full queue
            channel.get_nowait()


def format_report(report: RestoreReport) -> str:
    lines = [f"restored {report.files_restored} file(s) ({report.files_skipped} already done): "
             f"{report.images_ok} ok, {report.images_failed} failed; {report.megapixels:.1f} MP in "
             f"{report.seconds:.1f} s = {report.megapixels_per_s:.3f} MP/s (first rows after "
             f"{report.first_rows_seconds:.1f} s); model {report.model_version}",
             f"output: {report.output}"]
    for image_id, reason in report.failures[:10]:
        lines.append(f"  failed: {image_id}: {reason}")
    return "\n".join(lines)
