"""The model replica: what Ray Data's actor pool runs to restore units of work.

A replica streams its unit's row groups from storage, restores them (`ImageRestorer`:
decode, tiled forward, encode; one model call is bounded by rows and by pixels), and
streams the output to storage (a multipart upload completed only when the unit is whole).
It returns one `UnitResult` per unit (records.py). Image bytes never pass through Ray's
object store (nor the driver, but for the units it restores itself while Ray starts).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import itertools
import time
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import RestoreSettings
from pipeline.contract import OUTPUT_COLUMNS, DecodeLimits, ImageColumns, is_transient
from pipeline.dataset import PARQUET_COMPRESSION
from pipeline.images import declared_size
from pipeline.inference import ImageRestorer
from pipeline.lease import fence
from pipeline.noise import noise_bin
from pipeline.restore.planning import Unit
from pipeline.restore.records import UnitResult, arrow_schema

# Ray restarts a replica lost with its process or node and hands its unit to another; a unit
# that has taken its replica down this often (an image that crashes the decoder, say) fails
# the job instead of looping forever (Ray Data retries a lost actor's tasks without limit).
UNIT_ATTEMPTS = 4
RESULT_SCHEMA = arrow_schema(UnitResult)
OUTPUT_TYPES = {"status": pa.string(), "error": pa.string(), "model_version": pa.string(),
                "noise_sigma": pa.float64()}  # of contract.OUTPUT_COLUMNS


class PoisonedUnitError(RuntimeError):
    """A unit whose replica died again and again."""


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


def png_megapixels(encoded) -> float:
    # Read from the PNG header (width and height at bytes 16-24) rather than decoding again.
    total = 0
    for value in encoded:
        if value and len(value) >= 24:
            total += int.from_bytes(value[16:20], "big") * int.from_bytes(value[20:24], "big")
    return total / 1e6


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


class RowsByIndex:
    """Rows of a Parquet file by their index in the file, reading one row group at a time
    (the last one kept: the indices asked for come in order)."""

    def __init__(self, parquet: pq.ParquetFile):
        self.parquet = parquet
        sizes = (parquet.metadata.row_group(group).num_rows for group in range(parquet.num_row_groups))
        self.starts = list(itertools.accumulate(sizes, initial=0))
        self.group, self.rows = -1, None

    def take(self, indices: list[int]) -> pa.Table:
        pieces = []
        for index in indices:
            group = bisect.bisect_right(self.starts, index) - 1
            if group != self.group:
                self.group, self.rows = group, self.parquet.read_row_group(group)
            pieces.append(self.rows.slice(index - self.starts[group], 1))
        return pa.concat_tables(pieces)


class Progress:
    """Rows restored so far by all replicas (the driver's evidence that a long unit is still
    moving), attempts per unit, and the units the driver restores itself while the
    replicas start (executors.HeadStart): a Ray actor with no CPU of its own, whose calls
    run one at a time, so that a unit goes to the driver or to a replica, never both."""

    def __init__(self, driver_units: tuple[str, ...] = ()):
        self.rows = 0
        self.attempts: dict[str, int] = {}
        self.driver_units = set(driver_units)

    def add(self, rows: int) -> None:
        self.rows += rows

    def total(self) -> int:
        return self.rows

    def start(self, unit: str) -> int:
        """This attempt's number for a replica about to restore `unit`; 0 when the driver has it."""
        if unit in self.driver_units:
            return 0
        self.attempts[unit] = self.attempts.get(unit, 0) + 1
        return self.attempts[unit]

    def claim_for_driver(self, unit: str) -> bool:
        """The driver's head start asks for `unit`: refused once any replica has started
        (the replicas are up, and the head start is over)."""
        if self.attempts:
            return False
        self.driver_units.add(unit)
        return True

    def attempts_of(self) -> dict[str, int]:
        return self.attempts


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
                 limits: DecodeLimits = DecodeLimits(), base_dir: str | None = None, progress=None,
                 fenced_by: tuple[str, str] | None = None):
        import os
        import socket

        self.images = ImageRestorer(model_uri, settings, columns, limits, base_dir)
        self.settings, self.columns, self.progress = settings, columns, progress
        self.fenced_by = fenced_by  # (output, lease run): checked before each unit's output is committed
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.filesystem = None  # the inputs' (one job's files share it), made on the first unit

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = (self.restore_unit(Unit(**row)) for row in batch.to_pylist())
        return pa.Table.from_pylist([asdict(result) for result in results if result is not None], schema=RESULT_SCHEMA)

    def restore_unit(self, unit: Unit) -> UnitResult | None:
        """The unit restored; None when the driver restores it itself (under Ray)."""
        if self.progress is not None:  # under Ray (in-process, nothing counts attempts)
            import ray

            attempt = ray.get(self.progress.start.remote(unit.name))
            if attempt == 0:
                return None
            if attempt > UNIT_ATTEMPTS:
                raise PoisonedUnitError(f"{unit.input} row groups {unit.first}-{unit.last} took their replica down "
                                        f"{attempt - 1} times (an image that crashes the decoder or exhausts memory?); "
                                        f"lower the decode limits or remove the file, then rerun")
        if self.filesystem is None:
            self.filesystem = storage.pyarrow_filesystem(unit.input)[0]
        result = UnitResult(unit.key, unit.index, replica=self.replica, started=time.time())
        started = time.perf_counter()
        writer = storage.AtomicWriter(unit.target)
        with self._open(unit.input) as parquet, writer as sink:
            schema = output_schema(parquet.schema_arrow, self.columns)
            with pq.ParquetWriter(sink, schema, compression=PARQUET_COMPRESSION) as out:
                if unit.heal_rows:
                    self._retry_failed_rows(unit, parquet, schema, out, result)
                for group in range(unit.first, unit.last + 1) if not unit.heal_rows else ():
                    read_started = time.perf_counter()
                    try:
                        rows = parquet.read_row_group(group)
                    except storage.StorageError:
                        raise  # storage, not data: the unit fails and is retried whole
                    except Exception as error:
                        out.write_table(self._unreadable_group(parquet, group, error, schema, result))
                        continue
                    result.stages["read"] += time.perf_counter() - read_started
                    if rows.num_rows:
                        restored = self._restore_group(rows, schema, result)
                        write_started = time.perf_counter()
                        out.write_table(restored)
                        result.stages["write"] += time.perf_counter() - write_started
            if self.fenced_by is not None:  # the writer commits as this block ends: only for the lease's run
                fence(*self.fenced_by)
        result.stages["write"] += max(0.0, time.perf_counter() - started - sum(result.stages.values()))
        result.output_etag, result.output_size = writer.stored.etag, writer.stored.size
        result.finished = time.time()
        return result

    @contextlib.contextmanager
    def _open(self, uri: str):
        """A Parquet file read through `storage.retry` (RetryingInput)."""
        path = storage.parse(uri).path
        handle = storage.retry(lambda: self.filesystem.open_input_file(path), what=f"opening {uri}")
        with handle:
            yield pq.ParquetFile(RetryingInput(handle, uri))

    def _restore_group(self, rows: pa.Table, schema: pa.Schema, result: UnitResult) -> pa.Table:
        """Rows restored in model calls of one shape each, back in their order."""
        calls = model_calls(rows.column(self.columns.image), self.settings)
        return in_row_order([self._restore_rows(rows.take(call), schema, result) for call in calls], calls)

    def _retry_failed_rows(self, unit: Unit, parquet: pq.ParquetFile, schema: pa.Schema, out: pq.ParquetWriter,
                           result: UnitResult) -> None:
        """A finished file's rows that failed for a reason that can pass, restored again from
        the input; every other row carried unchanged from the earlier output, which the new
        one replaces whole (the writer's atomic commit) or not at all."""
        inputs = RowsByIndex(parquet)
        with self._open(unit.target) as earlier:
            if earlier.metadata.num_rows != parquet.metadata.num_rows:
                raise RuntimeError(f"{unit.target} has {earlier.metadata.num_rows} rows and its input "
                                   f"{unit.input} {parquet.metadata.num_rows}: not its output; rerun with --force")
            start = 0
            for group in range(earlier.num_row_groups):
                rows = earlier.read_row_group(group).cast(schema)
                failed = zip(rows.column("status").to_pylist(), rows.column("error").to_pylist())
                again = [row for row, (state, error) in enumerate(failed) if state == "failed" and is_transient(error)]
                kept = sorted(set(range(rows.num_rows)) - set(again))
                if again:
                    restored = self._restore_group(inputs.take([start + row for row in again]), schema, result)
                    rows = in_row_order([rows.take(kept), restored], [kept, again])
                result.rows += len(kept)
                result.carried += len(kept)
                out.write_table(rows)
                start += earlier.metadata.row_group(group).num_rows

    def _unreadable_group(self, parquet: pq.ParquetFile, group: int, error: Exception, schema: pa.Schema,
                          result: UnitResult) -> pa.Table:
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
        result.rows += count
        result.failed += count
        result.fail(f"(row group {group}, {count} rows)", reason)
        return pa.table([columns[name] for name in schema.names], schema=schema)

    def _restore_rows(self, rows: pa.Table, schema: pa.Schema, result: UnitResult) -> pa.Table:
        image = self.columns.image
        ids, id_errors = image_ids(rows.column(self.columns.id))
        values = [None if problem else value for value, problem in zip(rows.column(image).to_pylist(), id_errors)]
        out = self.images({image: values}, timings=result.stages)
        errors = [problem or error for problem, error in zip(id_errors, out["error"].tolist())]
        status = ["failed" if problem else state for problem, state in zip(id_errors, out["status"].tolist())]
        restored = {name: rows.column(name) for name in rows.column_names}
        restored[image] = pa.array(out[image], pa.binary())
        restored.update({"status": pa.array(status, pa.string()), "error": pa.array(errors, pa.string()),
                         "model_version": pa.array(out["model_version"], pa.string()),
                         "noise_sigma": pa.array(out["noise_sigma"].tolist(), pa.float64())})
        table = pa.table([restored[name] for name in schema.names], schema=schema)
        result.rows += table.num_rows
        result.ok += status.count("ok")
        result.failed += status.count("failed")
        result.transient += sum(map(is_transient, errors))
        result.skipped += status.count("skipped")
        result.per_channel += int(out["per_channel"].sum())
        result.megapixels += png_megapixels(png for png, state in zip(out[image], status) if state == "ok")
        for sigma in out["noise_sigma"]:
            if sigma is not None:
                result.noise_counts[noise_bin(sigma)] += 1
        for image_id, error in zip(ids, errors):
            if error:
                result.fail(image_id, error)
        if self.progress is not None:
            self.progress.add.remote(table.num_rows)  # fire and forget: the counter is only a heartbeat
        return table
