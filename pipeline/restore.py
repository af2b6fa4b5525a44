"""Restoring whole datasets with Ray Data batch inference.

    # laptop: local Ray, CPU actors, data in the local S3 server
    resflow restore --input s3://resflow/incoming/ --output s3://resflow/restored/ --model s3://resflow/models
    # cluster: RAY_ADDRESS set, one GPU per model replica
    resflow restore --input s3://... --output s3://... --model s3://... --workers 8 --gpu --batch-size 16

Ray Data hands input files to an actor pool of model replicas (`FileRestorer`). A replica
streams its file's row groups from object storage, restores them (`ImageRestorer`:
decode, tiled forward, encode), stores the output file whole (one PUT: atomic) and returns
one summary row; the driver records each finished file in the manifest
(`_resflow/manifest/`). Image bytes never pass through the driver or Ray's object store, so
reading and writing scale with the replicas; a replica holds one row group of its file's
input and the file's restored output.

A rerun restores only input files that are new, changed (ETag/size) or were restored by
another model version; `--force` redoes all. A run that makes no progress for
`stall_timeout_s` fails with a message saying where it stalled; the rerun completes it.
"""

from __future__ import annotations

import datetime as dt
import io
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import raycluster, registry, storage
from pipeline.config import RestoreSettings
from pipeline.contract import OUTPUT_COLUMNS, DecodeLimits, ImageColumns
from pipeline.dataset import PARQUET_COMPRESSION, inspect_dataset
from pipeline.inference import ImageRestorer
from pipeline.jobs import Events, RestoreJob
from pipeline.lease import OutputLease
from pipeline.manifest import Manifest
from pipeline.modelio import load_model

# A GPU replica's forward pass outruns one core's PNG decoding and encoding many times over
# (H200, DnCNN-S in bf16: ~120 MP/s at 16 rows per call; one core decodes and encodes under
# 10 MP/s): it decodes and encodes on its node's CPUs per GPU but one (left to Ray), and
# restores several files at once, so that their reads, writes and PNG work overlap one
# another's forward passes (a 4-image file costs ~25 ms of storage round trips here against
# ~5 ms of H200 forward).
GPU_FILES_AT_ONCE = 4
GPU_NODE_CPUS_WHEN_NONE_IS_UP = 8  # infra/k8s's GPU workers: the autoscaler starts them on demand
# Ray Data keeps one block per input file (the unit a replica takes), up to this many; a
# larger dataset packs several files into a block, which one replica restores in turn.
MAX_BLOCKS = 10_000
# While no file finishes, the driver asks the replicas' row counter this often whether rows
# are still being restored (a large file can take minutes), before calling it a stall.
PROGRESS_POLL_S = 5.0


class StallError(RuntimeError):
    """The pipeline delivered no rows for longer than the stall timeout."""


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
    """The input's path relative to the input prefix, under the output prefix."""
    return storage.join(job.output, storage.relative_path(job.input, input_info.uri))


@dataclass
class RestorePlan:
    todo: list[storage.FileInfo]  # new, changed, or restored by another model version (all with force)
    skipped: list[storage.FileInfo]  # done for this model version
    model_folder: str
    model_version: str
    rows: dict[str, int]  # rows per input file to restore, from the footers


def plan(job: RestoreJob) -> RestorePlan:
    """Check everything that can be checked before any work: input and output apart, the
    model loads (safetensors, architecture), the input is non-empty and every file has the
    contract's columns. A file counts as done only when its manifest entry matches the
    input (ETag, size), the model version, and an output that still exists unchanged."""
    storage.check_disjoint(job.input, job.output)
    model_folder = registry.resolve(job.model)
    _, card = load_model(model_folder)
    inspected = inspect_dataset(job.input, job.columns)
    done = Manifest(job.output, "manifest").all()
    outputs = {storage.relative_path(job.output, info.uri): info for info in _existing_outputs(job.output)}
    todo, skipped = [], []
    for info, _ in inspected:
        key = storage.relative_path(job.input, info.uri)
        entry, output = done.get(key) or {}, outputs.get(key)
        up_to_date = (entry.get("input_etag") == info.etag and entry.get("input_size") == info.size
                      and entry.get("model_version") == card.version and output is not None
                      and entry.get("output_etag") == output.etag and entry.get("output_size") == output.size)
        (skipped if up_to_date and not job.force else todo).append(info)
    wanted = {info.uri for info in todo}
    rows = {info.uri: footer.num_rows for info, footer in inspected if info.uri in wanted}
    return RestorePlan(todo, skipped, model_folder, card.version, rows)


def _existing_outputs(output: str) -> list[storage.FileInfo]:
    """Every Parquet file under the output (one listing), or none when it does not exist yet."""
    try:
        return storage.list_files(output)
    except FileNotFoundError:
        return []


def output_schema(schema: pa.Schema, columns: ImageColumns) -> pa.Schema:
    """The input's columns in place (the image now PNG bytes), then status, error and
    model_version (replaced in place when the input already has them: a restored dataset
    restored again)."""
    fields = [pa.field(f.name, pa.binary()) if f.name == columns.image else f for f in schema]
    for name in OUTPUT_COLUMNS:
        added = pa.field(name, pa.string())
        position = schema.get_field_index(name)
        if position >= 0:
            fields[position] = added
        else:
            fields.append(added)
    return pa.schema(fields)


class RetryingInput(io.RawIOBase):
    """A Parquet input read through `storage.retry`: a storage error (after the operation
    budget) surfaces as StorageError, so any other error while decoding a row group means
    the bytes themselves are bad, which fails that group's rows instead of the job."""

    def __init__(self, handle, uri: str):
        self.handle, self.uri, self.position = handle, uri, 0
        self.size = storage.retry(handle.size, what=f"sizing {uri}")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence] + offset
        return self.position

    def readinto(self, buffer) -> int:
        try:
            data = storage.retry(lambda: self.handle.read_at(len(buffer), self.position), what=f"reading {self.uri}")
        except Exception as error:
            raise storage.StorageError(f"reading {self.uri} at byte {self.position}: {error}") from error
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


class FileRestorer:
    """A model replica, as Ray Data's actor pool runs it: restores whole input files.

    For each file of a batch it streams the input's row groups from storage, restores their
    rows `settings.batch_size` at a time (`ImageRestorer`), writes one output row group per
    input row group into an in-memory Parquet file, and stores that file whole (one PUT,
    so a reader never sees part of it). The other columns pass through as Arrow, types
    untouched. Returns one summary row per file, with the stored output's ETag and size.
    A bad row (undecodable image, null or non-UTF-8 id, a row group whose bytes are
    corrupt) is a `failed` row with its reason; `progress` (an actor handle with `add`)
    hears of every restored chunk, which is how the driver tells a long file from a stall."""

    def __init__(self, model_uri: str, settings: RestoreSettings, columns: ImageColumns = ImageColumns(),
                 limits: DecodeLimits = DecodeLimits(), base_dir: str | None = None, progress=None):
        self.images = ImageRestorer(model_uri, settings, columns, limits, base_dir)
        self.rows_per_call = settings.rows_per_call
        self.columns = columns
        self.progress = progress
        self.filesystem = None  # the inputs' (one job's files share it), made on the first file

    def __call__(self, batch: pa.Table) -> pa.Table:
        summaries = [self.restore_file(source, target)
                     for source, target in zip(batch.column("input").to_pylist(), batch.column("output").to_pylist())]
        return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)

    def restore_file(self, input_uri: str, output_uri: str) -> dict:
        restored, summary = self._restore(input_uri)
        stored = storage.write_bytes(output_uri, restored)
        return {"input": input_uri, "output": output_uri, "output_etag": stored.etag, "output_size": stored.size,
                **summary}

    def _restore(self, input_uri: str) -> tuple[bytes, dict]:
        if self.filesystem is None:
            self.filesystem = storage.pyarrow_filesystem(input_uri)[0]
        summary = {"rows": 0, "ok": 0, "failed": 0, "megapixels": 0.0, "failures": []}
        sink = pa.BufferOutputStream()
        path = storage.parse(input_uri).path
        handle = storage.retry(lambda: self.filesystem.open_input_file(path), what=f"opening {input_uri}")
        with handle:
            parquet = pq.ParquetFile(RetryingInput(handle, input_uri))
            schema = output_schema(parquet.schema_arrow, self.columns)
            with pq.ParquetWriter(sink, schema, compression=PARQUET_COMPRESSION) as writer:
                for group in range(parquet.num_row_groups):
                    try:
                        rows = parquet.read_row_group(group)
                    except storage.StorageError:
                        raise  # storage, not data: the file fails and is retried whole
                    except Exception as error:
                        writer.write_table(self._unreadable_group(parquet, group, error, schema, summary))
                        continue
                    parts = [self._restore_rows(rows.slice(start, self.rows_per_call), schema, summary)
                             for start in range(0, rows.num_rows, self.rows_per_call)]
                    if parts:
                        writer.write_table(pa.concat_tables(parts))
        return sink.getvalue().to_pybytes(), summary

    def _unreadable_group(self, parquet: pq.ParquetFile, group: int, error: Exception, schema: pa.Schema,
                          summary: dict) -> pa.Table:
        """A row group whose bytes do not decode: its rows become failed rows, keeping every
        column that still reads (the id, usually) and null where nothing can be read."""
        count = parquet.metadata.row_group(group).num_rows
        columns = {}
        for column in parquet.schema_arrow:
            try:
                columns[column.name] = parquet.read_row_group(group, columns=[column.name]).column(0)
            except storage.StorageError:
                raise
            except Exception:
                columns[column.name] = pa.nulls(count, column.type)
        reason = f"row group {group} of the input could not be read ({type(error).__name__}: {error})"
        columns[self.columns.image] = pa.nulls(count, pa.binary())
        columns.update({"status": pa.array(["failed"] * count), "error": pa.array([reason] * count),
                        "model_version": pa.array([self.images.model_version] * count)})
        summary["rows"] += count
        summary["failed"] += count
        if len(summary["failures"]) < MAX_FAILURES_KEPT:
            summary["failures"].append([f"(row group {group}, {count} rows)", reason])
        return pa.table([columns[name] for name in schema.names], schema=schema)

    def _restore_rows(self, rows: pa.Table, schema: pa.Schema, summary: dict) -> pa.Table:
        image = self.columns.image
        ids, id_errors = image_ids(rows.column(self.columns.id))
        values = [None if problem else value for value, problem in zip(rows.column(image).to_pylist(), id_errors)]
        out = self.images({image: values})
        errors = [problem or error for problem, error in zip(id_errors, out["error"].tolist())]
        status = ["failed" if error else "ok" for error in errors]
        restored = {name: rows.column(name) for name in rows.column_names}
        restored[image] = pa.array(out[image], pa.binary())
        restored.update({"status": pa.array(status, pa.string()), "error": pa.array(errors, pa.string()),
                         "model_version": pa.array(out["model_version"], pa.string())})
        table = pa.table([restored[field.name] for field in schema], schema=schema)
        summary["rows"] += table.num_rows
        summary["ok"] += status.count("ok")
        summary["failed"] += status.count("failed")
        summary["megapixels"] += _megapixels(out[image])
        for image_id, error in zip(ids, errors):
            if error and len(summary["failures"]) < MAX_FAILURES_KEPT:
                summary["failures"].append([image_id, error])
        if self.progress is not None:
            self.progress.add.remote(table.num_rows)  # fire and forget: the counter is only a heartbeat
        return table


def image_ids(column: pa.ChunkedArray) -> tuple[list[str], list[str | None]]:
    """Printable ids and, per row, why the id is unusable (null, not UTF-8) or None. Read
    as bytes: one bad value must not make the whole column unreadable."""
    printable, problems = [], []
    for raw in column.cast(pa.large_binary()).to_pylist():
        if raw is None:
            printable.append("(null id)")
            problems.append("the image id is null")
            continue
        try:
            printable.append(raw.decode("utf-8"))
            problems.append(None)
        except UnicodeDecodeError:
            printable.append(repr(raw))
            problems.append(f"the image id {raw!r} is not valid UTF-8")
    return printable, problems


MAX_FAILURES_KEPT = 20  # per file and per report: the first few reasons, not every failed row
SUMMARY_SCHEMA = pa.schema([("input", pa.string()), ("output", pa.string()), ("output_etag", pa.string()),
                            ("output_size", pa.int64()), ("rows", pa.int64()),
                            ("ok", pa.int64()), ("failed", pa.int64()), ("megapixels", pa.float64()),
                            ("failures", pa.list_(pa.list_(pa.string())))])  # [image id, reason]


class RowCounter:
    """Rows restored so far by all replicas: the driver's evidence that a job whose files
    take long is still moving (a Ray actor with no CPU of its own)."""

    def __init__(self):
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def total(self) -> int:
        return self.rows


def restore_dataset(job: RestoreJob, events: Events | None = None) -> RestoreReport:
    """Restore every new or changed input file; `events` hears log lines and progress
    (images done of images to restore) after each finished output file. Starts local Ray
    when none is connected (raycluster.connect).

    The run holds the output's lease (pipeline/lease.py) from before planning to the end,
    so a second run on the same output waits or stops instead of writing beside it."""
    events = events or Events()
    storage.check_disjoint(job.input, job.output)  # before the lease, which writes under the output
    with OutputLease(job.output, ttl_s=job.lease_ttl_s, wait_s=job.lease_wait_s, log=events.log) as lease:
        return _restore_holding_lease(job, lease, events)


def replica_settings(job: RestoreJob, resources: dict) -> tuple[int, RestoreSettings, dict, int]:
    """How many replicas, the settings each runs with, its Ray resources, and how many
    files it restores at once: derived from the job and what the cluster offers."""
    workers = job.workers or (max(1, int(resources.get("GPU", 1))) if job.use_gpu
                              else max(1, int(resources.get("CPU", 2) // 2)))
    if job.use_gpu:
        io_threads = job.settings.io_threads or max(1, (raycluster.cpus_per_gpu() or GPU_NODE_CPUS_WHEN_NONE_IS_UP) - 1)
        settings = replace(job.settings, device="cuda", io_threads=io_threads)
        return workers, settings, {"num_gpus": 1, "num_cpus": io_threads}, GPU_FILES_AT_ONCE
    # one torch thread per core, so a second file at once would only contend for it
    settings = replace(job.settings, device="cpu", threads=job.settings.threads or
                       max(1, raycluster.physical_cores() // workers))
    return workers, settings, {"num_cpus": job.cpus_per_worker}, 1


def _restore_holding_lease(job: RestoreJob, lease: OutputLease, events: Events) -> RestoreReport:
    import ray
    import ray.data

    started = time.time()
    planned = plan(job)
    todo, skipped, model_version, expected = planned.todo, planned.skipped, planned.model_version, planned.rows
    report = RestoreReport(job.output, model_version, files_total=len(todo) + len(skipped), files_skipped=len(skipped))
    if not todo:
        events.log(f"nothing to restore: all {len(skipped)} input file(s) are done for model {model_version}")
        report.seconds = time.time() - started
        return report
    workers, settings, actor_options, files_at_once = replica_settings(job, raycluster.connect())
    report.images_total = sum(expected.values())
    events.progress(0, report.images_total)
    if len(todo) < workers:
        events.log(f"note: {len(todo)} file(s) for {workers} replicas: a file is restored by one replica, so "
                   f"{workers - len(todo)} will idle; a dataset of more, smaller files spreads over more replicas")
    events.log(f"restoring {len(todo)} file(s), {report.images_total} images, with model {model_version} on "
               f"{workers} {'GPU' if job.use_gpu else 'CPU'} replica(s) ({settings.rows_per_call} rows per call, "
               f"{settings.io_threads or 1} PNG thread(s) and {files_at_once} file(s) at once each); "
               f"{len(skipped)} file(s) already done")

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = events.interactive
    counter = ray.remote(num_cpus=0)(RowCounter).remote()
    units = [{"input": info.uri, "output": output_uri(job, info)} for info in todo]
    restored = ray.data.from_items(units, override_num_blocks=min(len(units), MAX_BLOCKS)).map_batches(
        FileRestorer,
        fn_constructor_kwargs={"model_uri": planned.model_folder, "settings": settings, "columns": job.columns,
                               "limits": job.limits, "base_dir": job.input, "progress": counter},
        batch_size=1, batch_format="pyarrow",
        # Every replica starts at once (model loads overlap one another); the pool may shrink
        # to one when a node is lost, and Ray Data retries a lost replica's files elsewhere.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers, initial_size=workers,
                                           max_concurrent_calls_per_actor=files_at_once,
                                           enable_true_multi_threading=files_at_once > 1),
        **actor_options,
    )

    def rows_restored() -> int:
        try:
            return ray.get(counter.total.remote(), timeout=PROGRESS_POLL_S)
        except Exception:  # an unreachable counter proves nothing either way
            return -1

    def where() -> str:
        return (f"{report.files_restored}/{len(todo)} file(s) written, {report.images_ok + report.images_failed} "
                f"rows in them; the replicas last reported {max(rows_restored(), 0)} rows restored")

    manifest = Manifest(job.output, "manifest")
    by_uri = {info.uri: info for info in todo}
    try:
        for batch in _batches_with_watchdog(restored, job.stall_timeout_s, where, rows_restored):
            report.first_rows_seconds = report.first_rows_seconds or time.time() - started
            for done in batch.to_pylist():
                info = by_uri[done["input"]]
                if done["rows"] != expected[info.uri]:
                    raise RuntimeError(f"{info.uri} had {expected[info.uri]} rows when planned and {done['rows']} "
                                       f"when restored: it changed during the run; rerun to restore it again")
                lease.check()  # never record a result once another run may own the output
                manifest.put(storage.relative_path(job.input, info.uri), {
                    "input": info.uri, "input_etag": info.etag, "input_size": info.size, "output": done["output"],
                    "output_etag": done["output_etag"], "output_size": done["output_size"],
                    "model_version": model_version, "rows": done["rows"], "ok": done["ok"], "failed": done["failed"],
                    "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                })
                report.files_restored += 1
                report.images_ok += done["ok"]
                report.images_failed += done["failed"]
                report.megapixels += done["megapixels"]
                report.outputs.append(done["output"])
                for image_id, reason in done["failures"]:
                    if len(report.failures) < MAX_FAILURES_KEPT:
                        report.failures.append((image_id, reason))
                events.progress(report.images_ok + report.images_failed, report.images_total)
    finally:
        ray.kill(counter)
        try:
            lease.check()
            manifest.compact()
        except Exception as error:  # the entries stay valid one by one; never mask the run's own error
            events.log(f"manifest not compacted ({error}); the next run reads its entries one by one")
    if report.files_restored != len(todo):
        raise RuntimeError(f"restore ended early: {report.files_restored} of {len(todo)} file(s) complete; "
                           f"rerun to finish (done files are skipped)")
    report.seconds = time.time() - started
    return report


def _megapixels(encoded) -> float:
    # Read from the PNG header (width and height at bytes 16-24) rather than decoding again.
    total = 0
    for value in encoded:
        if value and len(value) >= 24:
            total += int.from_bytes(value[16:20], "big") * int.from_bytes(value[20:24], "big")
    return total / 1e6


def _batches_with_watchdog(dataset, stall_timeout_s: float, where, rows_restored=lambda: -1):
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
                                     f"files are kept, and a rerun restores the rest") from None
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


def format_report(report: dict) -> str:
    """What `resflow restore` prints without --json (`report`: RestoreReport.to_dict())."""
    lines = [f"restored {report['files_restored']} file(s) ({report['files_skipped']} already done): "
             f"{report['images_ok']} ok, {report['images_failed']} failed; {report['megapixels']:.1f} MP in "
             f"{report['seconds']:.1f} s = {report['megapixels_per_s']:.3f} MP/s (first rows after "
             f"{report['first_rows_seconds']:.1f} s); model {report['model_version']}",
             f"output: {report['output']}"]
    for image_id, reason in report["failures"][:10]:
        lines.append(f"  failed: {image_id}: {reason}")
    return "\n".join(lines)
