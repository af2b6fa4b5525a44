"""Restoring whole datasets with Ray Data batch inference.

    # laptop: local Ray, CPU replicas, data in the local S3 server
    resflow restore --input s3://resflow/incoming/ --output s3://resflow/restored/ --model s3://resflow/models
    # cluster: RAY_ADDRESS set, one GPU per model replica
    resflow restore --input s3://... --output s3://... --model s3://... --workers 8 --gpu

Work is cut into units of whole row groups (at most `unit_rows` rows and `unit_megabytes`
of compressed input each, read from the footers), so one large file spreads over every
replica. Ray Data hands the units to an actor pool of model replicas (`UnitRestorer`). A
replica streams its unit's row groups from storage, restores them (`ImageRestorer`:
decode, tiled forward, encode; one model call is bounded by rows and by pixels), and
streams the output to storage (a multipart upload completed only when the unit is whole).
A file of one unit is written straight to its output; a file of several units is written
as parts under `<output>/_resflow/parts/`, and once its last part is done an assembly task
streams them, row group by row group, into the one output file. Either way readers see an
output file whole or not at all, with every input row once, in order.

The driver only plans, records and watches: each finished unit of a multi-unit file is
recorded (`_resflow/units/`), each finished file in the manifest (`_resflow/manifest/`).
A rerun restores only files that are new, changed or not done by this model version, and
of those only the units not finished; `force` redoes all. Image bytes never pass through
the driver or Ray's object store. docs/architecture.md draws the path; docs/scaling.md
says how far it goes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import raycluster, registry, storage
from pipeline.config import RestoreSettings
from pipeline.contract import OUTPUT_COLUMNS, DecodeLimits, ImageColumns
from pipeline.dataset import PARQUET_COMPRESSION, dataset_files, read_footers
from pipeline.images import declared_size, validate_schema
from pipeline.inference import ImageRestorer
from pipeline.jobs import Events, RestoreJob
from pipeline.lease import OutputLease
from pipeline.manifest import Manifest
from pipeline.modelio import load_model
from pipeline.noise import NOISE_BINS, noise_bin, noise_summary

# A GPU replica's forward pass outruns one core's PNG work many times over: it decodes and
# encodes on its node's CPUs per GPU but one and restores several units at once, so that
# their reads, writes and PNG work overlap one another's forward passes (bench/README.md).
GPU_UNITS_AT_ONCE = 4
GPU_NODE_CPUS_WHEN_NONE_IS_UP = 8  # infra/k8s's GPU workers: the autoscaler starts them on demand
MAX_BLOCKS = 10_000  # Ray Data blocks (a unit each, up to this many; then several units a block)
PROGRESS_POLL_S = 5.0  # how often the driver asks whether rows are still being restored
# Ray restarts a replica lost with its process or node and hands its unit to another; a unit
# that has taken its replica down this often (an image that crashes the decoder, say) fails
# the job instead of looping forever (Ray Data retries a lost actor's tasks without limit).
UNIT_ATTEMPTS = 4
SPLIT_AT_LEAST = 8  # a file too large for one unit is cut into this many at least (or one per row group)
ASSEMBLY_CPUS = 0.25  # an assembly task streams bytes: it needs little CPU of its own
# The driver records what finished in batches, one PUT every few seconds whatever the files
# per second; a crash loses at most these seconds of records (their files are redone).
RECORD_EVERY_S = 3.0


class StallError(RuntimeError):
    """The pipeline delivered no rows for longer than the stall timeout."""


class PoisonedUnitError(RuntimeError):
    """A unit whose replica died again and again."""


@dataclass
class RestoreReport:
    output: str
    model_version: str
    files_total: int = 0
    files_restored: int = 0
    files_skipped: int = 0
    units_restored: int = 0  # units of work restored by this run
    units_skipped: int = 0  # units of unfinished files that an earlier run had finished
    images_total: int = 0  # rows in the units to restore this run
    images_ok: int = 0
    images_failed: int = 0
    images_skipped: int = 0  # left untouched: too small, or less noisy than skip_below
    images_per_channel: int = 0  # colour images a gray model restored one channel at a time (a colour model would not)
    # estimated noise sigma of the rows this run read: count per whole sigma, 0-1, 1-2, ...,
    # the last bin holding everything above (pipeline/noise.py, `noise_summary`)
    noise_sigma_counts: list = field(default_factory=lambda: [0] * NOISE_BINS)
    megapixels: float = 0.0
    seconds: float = 0.0
    first_rows_seconds: float = 0.0  # start-up: planning, Ray Data and model replicas until the first restored rows
    rows_by_replica: dict = field(default_factory=dict)  # replica (host:pid) -> rows it restored
    units_retried: list = field(default_factory=list)  # units restored again after their replica was lost
    stage_seconds: dict = field(default_factory=dict)  # busy seconds of all replicas per stage: read, decode, ...
    failures: list = field(default_factory=list)  # first few (image_id, reason)
    outputs: list = field(default_factory=list)

    @property
    def megapixels_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "megapixels_per_s": self.megapixels_per_s}


# --- planning -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """Whole row groups `first`..`last` of one input file: what one replica restores at once."""

    key: str  # the input file's path relative to the input prefix
    input: str
    first: int
    last: int
    rows: int
    index: int  # this unit's place among its file's units
    count: int  # how many units the file has
    target: str  # the output file itself (count == 1), or this unit's staged part

    @property
    def name(self) -> str:
        return f"{self.key}/{self.first:06d}-{self.last:06d}"


@dataclass
class FilePlan:
    info: storage.FileInfo
    key: str
    output: str
    rows: int
    units: list[Unit]
    done: dict = field(default_factory=dict)  # unit index -> part record of an earlier run


@dataclass
class RestorePlan:
    files: list[FilePlan]  # to restore: new, changed, or not done by this model version (all with force)
    skipped: list[storage.FileInfo]  # done for this model version, outputs unchanged
    model_folder: str
    model_version: str

    @property
    def todo(self) -> list[storage.FileInfo]:
        return [file.info for file in self.files]

    @property
    def rows(self) -> dict[str, int]:
        return {file.info.uri: file.rows for file in self.files}


def output_uri(job: RestoreJob, input_info: storage.FileInfo) -> str:
    """The input's path relative to the input prefix, under the output prefix."""
    return storage.join(job.output, storage.relative_path(job.input, input_info.uri))


def output_recipe(job: RestoreJob) -> dict:
    """What decides an output's rows besides the input and the model: the columns restore
    adds and which rows it leaves untouched. An output or part made under another recipe
    is redone (a rerun with another --skip-below, or after the output contract grew)."""
    return {"columns": list(OUTPUT_COLUMNS), "skip_below": job.settings.skip_below}


def part_folder(job: RestoreJob, key: str, info: storage.FileInfo, model_version: str) -> str:
    """Where a file's parts are staged: named by the input's identity, the model version
    and the output recipe, so parts of another input, model or recipe never mix with these."""
    recipe = json.dumps(output_recipe(job), sort_keys=True)
    identity = hashlib.sha256(f"{info.etag}|{info.size}|{model_version}|{recipe}".encode()).hexdigest()[:16]
    return storage.join(job.output, storage.RESFLOW_DIR, "parts", key, identity)


def split_into_units(footer: pq.FileMetaData, max_rows: int, max_bytes: int) -> list[tuple[int, int, int]]:
    """(first, last, rows) of consecutive whole row groups. A file within `max_rows` and
    `max_bytes` (compressed) is one unit; a larger one is cut into at least
    SPLIT_AT_LEAST units of about equal rows, so that one large file keeps several
    replicas busy. Depends only on the file and the limits: a rerun cuts the same units."""
    groups = [(footer.row_group(g).num_rows,
               sum(footer.row_group(g).column(c).total_compressed_size for c in range(footer.row_group(g).num_columns)))
              for g in range(footer.num_row_groups)]
    if not groups:
        return [(0, -1, 0)]  # a file without rows still gets its (empty) output
    rows, size = sum(r for r, _ in groups), sum(b for _, b in groups)
    count = max(math.ceil(rows / max_rows), math.ceil(size / max_bytes))
    if count > 1:
        count = min(max(count, SPLIT_AT_LEAST), len(groups))
    target = rows / count
    units, first, taken, done = [], 0, 0, 0
    for group, (group_rows, _) in enumerate(groups):
        taken += group_rows
        if done + taken >= target * (len(units) + 1) - 1e-9 or group == len(groups) - 1:
            units.append((first, group, taken))
            done, first, taken = done + taken, group + 1, 0
    return units


def plan(job: RestoreJob) -> RestorePlan:
    """Everything that can be checked before any work: input and output apart, the model
    loads, the input is not empty, every file to restore has the contract's columns. A file
    is done when its manifest entry matches the input (ETag, size), the model version, the
    output recipe (`output_recipe`), and an output that still exists unchanged: one listing
    of each prefix and the manifest, and footers only of the files to restore."""
    storage.check_disjoint(job.input, job.output)
    model_folder = registry.resolve(job.model)
    _, card = load_model(model_folder)
    inputs = dataset_files(job.input)
    done = Manifest(job.output, "manifest").all()
    outputs = {storage.relative_path(job.output, info.uri): info for info in _existing(job.output)}
    todo, skipped = [], []
    recipe = output_recipe(job)
    for info in inputs:
        key = storage.relative_path(job.input, info.uri)
        entry, output = done.get(key) or {}, outputs.get(key)
        up_to_date = (entry.get("input_etag") == info.etag and entry.get("input_size") == info.size
                      and entry.get("model_version") == card.version and entry.get("recipe") == recipe
                      and output is not None
                      and entry.get("output_etag") == output.etag and entry.get("output_size") == output.size)
        (skipped if up_to_date and not job.force else todo).append((key, info))
    footers = read_footers([info for _, info in todo])
    for (_, info), footer in zip(todo, footers):
        validate_schema(footer.schema.to_arrow_schema(), job.columns, where=info.uri)
    units_done = Manifest(job.output, "units").all() if not job.force else {}
    parts = {info.uri: info for info in _existing(storage.join(job.output, storage.RESFLOW_DIR, "parts"))}
    files = []
    for (key, info), footer in zip(todo, footers):
        bounds = split_into_units(footer, job.unit_rows, int(job.unit_megabytes * 2**20))
        folder = part_folder(job, key, info, card.version)
        units = [Unit(key, info.uri, first, last, rows, index, len(bounds),
                      output_uri(job, info) if len(bounds) == 1 else storage.join(folder, f"{first:06d}-{last:06d}.parquet"))
                 for index, (first, last, rows) in enumerate(bounds)]
        file = FilePlan(info, key, output_uri(job, info), footer.num_rows, units)
        for unit in units if len(units) > 1 else []:
            record, part = units_done.get(unit.name) or {}, parts.get(unit.target)
            if (part is not None and record.get("part") == unit.target and record.get("part_etag") == part.etag
                    and record.get("model_version") == card.version and record.get("input_etag") == info.etag):
                file.done[unit.index] = record
        files.append(file)
    return RestorePlan(files, [info for _, info in skipped], model_folder, card.version)


def _existing(prefix: str) -> list[storage.FileInfo]:
    """Every Parquet file under `prefix` (one listing), or none when it does not exist yet."""
    try:
        return storage.list_files(prefix)
    except FileNotFoundError:
        return []


# --- the replica ---------------------------------------------------------------------------------


OUTPUT_TYPES = {"status": pa.string(), "error": pa.string(), "model_version": pa.string(),
                "noise_sigma": pa.float64()}  # of contract.OUTPUT_COLUMNS


def output_schema(schema: pa.Schema, columns: ImageColumns) -> pa.Schema:
    """The input's columns in place (the image now PNG bytes, or the input's own bytes where
    skipped), then status, error, model_version and noise_sigma (replaced in place when the
    input already has them: a restored dataset restored again)."""
    fields = [pa.field(f.name, pa.binary()) if f.name == columns.image else f for f in schema]
    for name in OUTPUT_COLUMNS:
        added = pa.field(name, OUTPUT_TYPES[name])
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


class UnitRestorer:
    """A model replica, as Ray Data's actor pool runs it: restores units of work.

    For each unit it streams the unit's row groups from storage, restores their rows in
    model calls bounded by rows and decoded pixels (`ImageRestorer`), and streams one
    output row group per input row group to the unit's target (`storage.AtomicWriter`), so
    it holds one row group and its output, never a file. Other columns pass through as
    Arrow, types untouched. A bad row (undecodable image, null or non-UTF-8 id, a row
    group whose bytes are corrupt) is a `failed` row with its reason. `progress` (a
    `Progress` actor) hears of every restored call, which tells a long unit from a stall,
    and counts attempts, which stops a unit that keeps killing its replica."""

    def __init__(self, model_uri: str, settings: RestoreSettings, columns: ImageColumns = ImageColumns(),
                 limits: DecodeLimits = DecodeLimits(), base_dir: str | None = None, progress=None):
        import os
        import socket

        self.images = ImageRestorer(model_uri, settings, columns, limits, base_dir)
        self.settings, self.columns, self.progress = settings, columns, progress
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.filesystem = None  # the inputs' (one job's files share it), made on the first unit

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.restore_unit(Unit(**row)) for row in batch.to_pylist()],
                                    schema=SUMMARY_SCHEMA)

    def restore_unit(self, unit: Unit) -> dict:
        import ray

        if self.progress is not None:
            attempt = ray.get(self.progress.start.remote(unit.name))
            if attempt > UNIT_ATTEMPTS:
                raise PoisonedUnitError(f"{unit.input} row groups {unit.first}-{unit.last} took their replica down "
                                        f"{attempt - 1} times (an image that crashes the decoder or exhausts memory?); "
                                        f"lower the decode limits or remove the file, then rerun")
        if self.filesystem is None:
            self.filesystem = storage.pyarrow_filesystem(unit.input)[0]
        summary = {"rows": 0, "ok": 0, "failed": 0, "skipped": 0, "per_channel": 0, "megapixels": 0.0, "failures": [],
                   "noise_counts": [0] * NOISE_BINS,
                   "stages": dict.fromkeys(("read", "decode", "noise", "forward", "encode", "write"), 0.0)}
        started = time.perf_counter()
        path = storage.parse(unit.input).path
        handle = storage.retry(lambda: self.filesystem.open_input_file(path), what=f"opening {unit.input}")
        writer = storage.AtomicWriter(unit.target)
        with handle:
            parquet = pq.ParquetFile(RetryingInput(handle, unit.input))
            schema = output_schema(parquet.schema_arrow, self.columns)
            with writer as sink, pq.ParquetWriter(sink, schema, compression=PARQUET_COMPRESSION) as out:
                for group in range(unit.first, unit.last + 1):
                    read_started = time.perf_counter()
                    try:
                        rows = parquet.read_row_group(group)
                    except storage.StorageError:
                        raise  # storage, not data: the unit fails and is retried whole
                    except Exception as error:
                        out.write_table(self._unreadable_group(parquet, group, error, schema, summary))
                        continue
                    summary["stages"]["read"] += time.perf_counter() - read_started
                    calls = model_calls(rows.column(self.columns.image), self.settings)
                    parts = [self._restore_rows(rows.take(call), schema, summary) for call in calls]
                    if parts:
                        write_started = time.perf_counter()
                        out.write_table(in_row_order(parts, calls))
                        summary["stages"]["write"] += time.perf_counter() - write_started
        summary["stages"]["write"] += max(0.0, time.perf_counter() - started - sum(summary["stages"].values()))
        return {**asdict(unit), "output_etag": writer.stored.etag, "output_size": writer.stored.size,
                "replica": self.replica, **summary}

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
                        "model_version": pa.array([self.images.model_version] * count),
                        "noise_sigma": pa.nulls(count, pa.float64())})
        summary["rows"] += count
        summary["failed"] += count
        if len(summary["failures"]) < MAX_FAILURES_KEPT:
            summary["failures"].append([f"(row group {group}, {count} rows)", reason])
        return pa.table([columns[name] for name in schema.names], schema=schema)

    def _restore_rows(self, rows: pa.Table, schema: pa.Schema, summary: dict) -> pa.Table:
        image = self.columns.image
        ids, id_errors = image_ids(rows.column(self.columns.id))
        values = [None if problem else value for value, problem in zip(rows.column(image).to_pylist(), id_errors)]
        out = self.images({image: values}, timings=summary["stages"])
        errors = [problem or error for problem, error in zip(id_errors, out["error"].tolist())]
        status = ["failed" if problem else state for problem, state in zip(id_errors, out["status"].tolist())]
        restored = {name: rows.column(name) for name in rows.column_names}
        restored[image] = pa.array(out[image], pa.binary())
        restored.update({"status": pa.array(status, pa.string()), "error": pa.array(errors, pa.string()),
                         "model_version": pa.array(out["model_version"], pa.string()),
                         "noise_sigma": pa.array(out["noise_sigma"].tolist(), pa.float64())})
        table = pa.table([restored[name] for name in schema.names], schema=schema)
        summary["rows"] += table.num_rows
        summary["ok"] += status.count("ok")
        summary["failed"] += status.count("failed")
        summary["skipped"] += status.count("skipped")
        summary["per_channel"] += int(out["per_channel"].sum())
        summary["megapixels"] += _megapixels(png for png, state in zip(out[image], status) if state == "ok")
        for sigma in out["noise_sigma"]:
            if sigma is not None:
                summary["noise_counts"][noise_bin(sigma)] += 1
        for image_id, error in zip(ids, errors):
            if error and len(summary["failures"]) < MAX_FAILURES_KEPT:
                summary["failures"].append([image_id, error])
        if self.progress is not None:
            self.progress.add.remote(table.num_rows)  # fire and forget: the counter is only a heartbeat
        return table


def model_calls(images: pa.ChunkedArray, settings: RestoreSettings) -> list[list[int]]:
    """Row indices per model call, rows of one declared shape together (read from the image
    headers; rows keep their order within a shape), so that a forward pass of several rows
    is full and never mixes shapes. A call holds at most `rows_per_call` rows and about
    `max_call_megapixels` of decoded pixels, so sixteen 64-MP images are sixteen calls,
    not one; a larger image is a call of its own. The caller puts the rows back in order."""
    limit = settings.max_call_megapixels * 1e6
    buckets: dict = {}  # declared (width, height), None when unknown -> rows
    for row, value in enumerate(images.to_pylist()):
        buckets.setdefault(declared_size(value), []).append(row)
    calls = []
    for size, rows in buckets.items():
        pixels_each = size[0] * size[1] if size else 0
        current: list[int] = []
        for row in rows:
            if current and (len(current) >= settings.rows_per_call or (len(current) + 1) * pixels_each > limit):
                calls.append(current)
                current = []
            current.append(row)
        calls.append(current)
    return calls


def in_row_order(parts: list[pa.Table], calls: list[list[int]]) -> pa.Table:
    """The restored calls' rows, back in the order of the input rows."""
    table = pa.concat_tables(parts)
    order = [row for call in calls for row in call]
    if order == sorted(order):
        return table
    position = [0] * len(order)
    for place, row in enumerate(order):
        position[row] = place
    return table.take(pa.array(position))


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


MAX_FAILURES_KEPT = 20  # per unit and per report: the first few reasons, not every failed row
SUMMARY_SCHEMA = pa.schema([
    ("key", pa.string()), ("input", pa.string()), ("first", pa.int64()), ("last", pa.int64()), ("rows", pa.int64()),
    ("index", pa.int64()), ("count", pa.int64()), ("target", pa.string()), ("output_etag", pa.string()),
    ("output_size", pa.int64()), ("replica", pa.string()), ("ok", pa.int64()), ("failed", pa.int64()),
    ("skipped", pa.int64()), ("per_channel", pa.int64()), ("megapixels", pa.float64()),
    ("failures", pa.list_(pa.list_(pa.string()))),  # [image id, reason]
    ("noise_counts", pa.list_(pa.int64())),  # rows per noise bin (pipeline/noise.py)
    ("stages", pa.map_(pa.string(), pa.float64())),
])


class Progress:
    """Rows restored so far by all replicas (the driver's evidence that a long unit is still
    moving) and attempts per unit (a Ray actor with no CPU of its own)."""

    def __init__(self):
        self.rows = 0
        self.attempts: dict[str, int] = {}

    def add(self, rows: int) -> None:
        self.rows += rows

    def total(self) -> int:
        return self.rows

    def start(self, unit: str) -> int:
        self.attempts[unit] = self.attempts.get(unit, 0) + 1
        return self.attempts[unit]

    def attempts_of(self) -> dict[str, int]:
        return self.attempts


def assemble(parts: list[str], output: str) -> dict:
    """Stream a file's parts, row group by row group, into its one output file (a Ray task):
    the output appears whole when the last row group is written, or not at all."""
    filesystem = storage.pyarrow_filesystem(parts[0])[0]
    writer = storage.AtomicWriter(output)
    with writer as sink:
        out = None
        for part in parts:
            with filesystem.open_input_file(storage.parse(part).path) as handle:
                parquet = pq.ParquetFile(handle)
                out = out or pq.ParquetWriter(sink, parquet.schema_arrow, compression=PARQUET_COMPRESSION)
                for group in range(parquet.num_row_groups):
                    out.write_table(parquet.read_row_group(group))
        out.close()
    return {"output_etag": writer.stored.etag, "output_size": writer.stored.size}


# --- the driver ----------------------------------------------------------------------------------


def restore_dataset(job: RestoreJob, events: Events | None = None) -> RestoreReport:
    """Restore every new or changed input file; `events` hears log lines and progress
    (images done of images to restore). Starts local Ray when none is connected
    (raycluster.connect).

    The run holds the output's lease (pipeline/lease.py) from before planning to the end,
    so a second run on the same output waits or stops instead of writing beside it."""
    events = events or Events()
    storage.check_disjoint(job.input, job.output)  # before the lease, which writes under the output
    with OutputLease(job.output, ttl_s=job.lease_ttl_s, wait_s=job.lease_wait_s, log=events.log) as lease:
        return Run(job, lease, events).execute()


def replica_settings(job: RestoreJob, resources: dict) -> tuple[int, RestoreSettings, dict, int]:
    """How many replicas, the settings each runs with, its Ray resources, and how many
    units it restores at once: derived from the job and what the cluster offers."""
    workers = job.workers or (max(1, int(resources.get("GPU", 1))) if job.use_gpu
                              else max(1, int(resources.get("CPU", 2) // 2)))
    if job.use_gpu:
        io_threads = job.settings.io_threads or max(1, (raycluster.cpus_per_gpu() or GPU_NODE_CPUS_WHEN_NONE_IS_UP) - 1)
        settings = replace(job.settings, device="cuda", io_threads=io_threads)
        return workers, settings, {"num_gpus": 1, "num_cpus": io_threads}, GPU_UNITS_AT_ONCE
    # one torch thread per core, so a second unit at once would only contend for it; as many
    # PNG threads, which work while the forward pass does not
    threads = job.settings.threads or max(1, raycluster.physical_cores() // workers)
    settings = replace(job.settings, device="cpu", threads=threads, io_threads=job.settings.io_threads or threads)
    return workers, settings, {"num_cpus": job.cpus_per_worker}, 1


class Run:
    """One restore run holding the output's lease: plan, dispatch units, record what
    finishes, assemble multi-unit files, watch for stalls."""

    def __init__(self, job: RestoreJob, lease: OutputLease, events: Events):
        self.job, self.lease, self.events = job, lease, events
        self.manifest = Manifest(job.output, "manifest")
        self.units_manifest = Manifest(job.output, "units")
        self.unrecorded: dict[str, dict] = {"manifest": {}, "units": {}}  # records not yet stored
        self.recorded_at = time.monotonic()
        self.started = time.time()

    def execute(self) -> RestoreReport:
        import ray
        import ray.data

        job, events = self.job, self.events
        planned = plan(job)
        self.files = {file.key: file for file in planned.files}
        report = self.report = RestoreReport(job.output, planned.model_version,
                                             files_total=len(planned.files) + len(planned.skipped),
                                             files_skipped=len(planned.skipped))
        if not planned.files:
            events.log(f"nothing to restore: all {len(planned.skipped)} input file(s) are done for model "
                       f"{planned.model_version}")
            report.seconds = time.time() - self.started
            return report
        pending = [unit for file in planned.files for unit in file.units if unit.index not in file.done]
        report.units_skipped = sum(len(file.done) for file in planned.files)
        report.images_total = sum(unit.rows for unit in pending)
        workers, settings, actor_options, units_at_once = replica_settings(job, raycluster.connect())
        events.progress(0, report.images_total)
        events.log(f"restoring {len(planned.files)} file(s) in {len(pending)} unit(s) ({report.units_skipped} "
                   f"already done), {report.images_total} images, with model {planned.model_version} on {workers} "
                   f"{'GPU' if job.use_gpu else 'CPU'} replica(s) ({settings.rows_per_call} rows per call, "
                   f"{settings.rows_per_forward} per forward pass, "
                   f"{settings.io_threads or 1} PNG thread(s), {units_at_once} unit(s) at once each); "
                   f"{len(planned.skipped)} file(s) already done")
        if len(pending) < workers:
            events.log(f"note: {len(pending)} unit(s) for {workers} replicas: {workers - len(pending)} will idle; "
                       f"smaller units (unit_rows) spread a few files over more replicas")
        ray.data.DataContext.get_current().enable_progress_bars = events.interactive
        self.progress = ray.remote(num_cpus=0)(Progress).remote()
        self.assembling: dict = {}  # Ray object ref -> file key
        self.assemble_task = ray.remote(num_cpus=ASSEMBLY_CPUS)(assemble)
        for file in planned.files:  # every unit done by an earlier run: only the assembly is left
            if file.units and len(file.done) == len(file.units):
                self._assemble(file)
        try:
            if pending:
                restored = ray.data.from_items([asdict(unit) for unit in pending],
                                               override_num_blocks=min(len(pending), MAX_BLOCKS)).map_batches(
                    UnitRestorer,
                    fn_constructor_kwargs={"model_uri": planned.model_folder, "settings": settings,
                                           "columns": job.columns, "limits": job.limits, "base_dir": job.input,
                                           "progress": self.progress},
                    batch_size=1, batch_format="pyarrow",
                    # every replica starts at once (model loads overlap one another); the pool may
                    # shrink to one when a node is lost, and Ray Data gives its units to another
                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers, initial_size=workers,
                                                       max_concurrent_calls_per_actor=units_at_once,
                                                       enable_true_multi_threading=units_at_once > 1),
                    **actor_options,
                )
                for batch in _batches_with_watchdog(restored, job.stall_timeout_s, self._where, self._rows_restored):
                    report.first_rows_seconds = report.first_rows_seconds or time.time() - self.started
                    for done in batch.to_pylist():
                        self._record(done)
                    self._collect_assemblies(timeout=0)
                    self._store_records()
            self._collect_assemblies(timeout=job.stall_timeout_s, all_of_them=True)
        finally:
            try:  # what finished stays recorded, whatever ended the run
                self._store_records(now=True)
            except Exception as error:
                events.log(f"could not record the last finished work ({error}); a rerun redoes it")
            try:
                attempts = ray.get(self.progress.attempts_of.remote(), timeout=PROGRESS_POLL_S)
                report.units_retried = sorted(unit for unit, count in attempts.items() if count > 1)
            except Exception:  # statistics only
                pass
            ray.kill(self.progress)
            for manifest in (self.manifest, self.units_manifest):
                try:
                    self.lease.check()
                    manifest.compact()
                except Exception as error:  # entries stay valid one by one; never mask the run's own error
                    events.log(f"{manifest.kind} not compacted ({error}); the next run reads its entries one by one")
        if report.files_restored != len(planned.files):
            raise RuntimeError(f"restore ended early: {report.files_restored} of {len(planned.files)} file(s) "
                               f"complete; rerun to finish (done files and units are skipped)")
        report.seconds = time.time() - self.started
        return report

    def _rows_restored(self) -> int:
        import ray

        try:
            return ray.get(self.progress.total.remote(), timeout=PROGRESS_POLL_S)
        except Exception:  # an unreachable counter proves nothing either way
            return -1

    def _where(self) -> str:
        report = self.report
        return (f"{report.files_restored}/{len(self.files)} file(s) and {report.units_restored} unit(s) written, "
                f"{report.images_ok + report.images_failed + report.images_skipped} rows in them; the replicas "
                f"last reported "
                f"{max(self._rows_restored(), 0)} rows restored")

    def _record(self, done: dict) -> None:
        """A unit finished: count it, record it, and finish its file when it was the last."""
        report, file = self.report, self.files[done["key"]]
        unit = file.units[done["index"]]
        if done["rows"] != unit.rows:
            raise RuntimeError(f"{file.info.uri} row groups {unit.first}-{unit.last} had {unit.rows} rows when "
                               f"planned and {done['rows']} when restored: it changed during the run; rerun")
        report.units_restored += 1
        report.images_ok += done["ok"]
        report.images_failed += done["failed"]
        report.images_skipped += done["skipped"]
        report.images_per_channel += done["per_channel"]
        report.noise_sigma_counts = [a + b for a, b in zip(report.noise_sigma_counts, done["noise_counts"])]
        report.megapixels += done["megapixels"]
        report.rows_by_replica[done["replica"]] = report.rows_by_replica.get(done["replica"], 0) + done["rows"]
        for stage, seconds in done["stages"]:
            report.stage_seconds[stage] = report.stage_seconds.get(stage, 0.0) + seconds
        for image_id, reason in done["failures"]:
            if len(report.failures) < MAX_FAILURES_KEPT:
                report.failures.append((image_id, reason))
        record = {"input_etag": file.info.etag, "model_version": report.model_version, "rows": done["rows"],
                  "ok": done["ok"], "failed": done["failed"], "skipped": done["skipped"],
                  "recipe": output_recipe(self.job)}
        if unit.count == 1:
            self._finish(file, {**record, "output_etag": done["output_etag"], "output_size": done["output_size"]})
        else:
            file.done[unit.index] = {**record, "part": unit.target, "part_etag": done["output_etag"]}
            self.unrecorded["units"][unit.name] = file.done[unit.index]
            if len(file.done) == len(file.units):
                self._assemble(file)
        self.events.progress(report.images_ok + report.images_failed + report.images_skipped, report.images_total)

    def _assemble(self, file: FilePlan) -> None:
        parts = [unit.target for unit in file.units]
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
            key = self.assembling.pop(ready[0])
            file = self.files[key]
            stored = ray.get(ready[0])
            rows = sum(record["rows"] for record in file.done.values())
            self._finish(file, {"input_etag": file.info.etag, "model_version": self.report.model_version,
                                "recipe": output_recipe(self.job), "rows": rows, "ok": sum(record["ok"] for record in file.done.values()),
                                "failed": sum(record["failed"] for record in file.done.values()),
                                "skipped": sum(record.get("skipped", 0) for record in file.done.values()), **stored,
                                "parts": len(file.units)})
            for unit in file.units:  # the parts are in the output now; their records and bytes can go
                self.unrecorded["units"][unit.name] = None
                try:
                    storage.delete(unit.target)
                except Exception as error:  # leftovers are skipped by readers and overwritten by reruns
                    self.events.log(f"could not clean up {unit.target}: {error}")

    def _finish(self, file: FilePlan, record: dict) -> None:
        if record["rows"] != file.rows:
            raise RuntimeError(f"{file.info.uri} had {file.rows} rows when planned and {record['rows']} in its "
                               f"output: it changed during the run; rerun to restore it again")
        self.unrecorded["manifest"][file.key] = {
            "input": file.info.uri, "input_size": file.info.size, "output": file.output,
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **record}
        self.report.files_restored += 1
        self.report.outputs.append(file.output)

    def _store_records(self, now: bool = False) -> None:
        """Store what finished since the last time, one batch per manifest, every
        RECORD_EVERY_S seconds (or `now`); never once another run may own the output."""
        if not now and time.monotonic() - self.recorded_at < RECORD_EVERY_S:
            return
        if any(self.unrecorded.values()):
            self.lease.check()
            self.manifest.put_many(self.unrecorded["manifest"])  # files first: a crash in between redoes less
            self.units_manifest.put_many(self.unrecorded["units"])
            self.unrecorded = {"manifest": {}, "units": {}}
        self.recorded_at = time.monotonic()


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


def format_report(report: dict) -> str:
    """What `resflow restore` prints without --json (`report`: RestoreReport.to_dict())."""
    lines = [f"restored {report['files_restored']} file(s) ({report['files_skipped']} already done) in "
             f"{report['units_restored']} unit(s): {report['images_ok']} ok, {report['images_skipped']} skipped, "
             f"{report['images_failed']} failed; "
             f"{report['megapixels']:.1f} MP in {report['seconds']:.1f} s = {report['megapixels_per_s']:.3f} MP/s "
             f"(first rows after {report['first_rows_seconds']:.1f} s); model {report['model_version']}",
             f"output: {report['output']}"]
    noise = noise_summary(report["noise_sigma_counts"])
    if noise["images"]:
        lines.append(f"estimated noise sigma: median {noise['median']:.1f} over {noise['images']} images; "
                     + ", ".join(f"{label}: {count}" for label, count in noise["bins"]))
    if report.get("images_per_channel"):
        lines.append(f"note: model {report['model_version']} is gray: {report['images_per_channel']} colour image(s) "
                     f"were restored one channel at a time, which ignores the correlation between channels; a colour "
                     f"model (train --preset cpu-color) restores them jointly")
    for image_id, reason in report["failures"][:10]:
        lines.append(f"  failed: {image_id}: {reason}")
    return "\n".join(lines)
