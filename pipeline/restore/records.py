"""The restore's ledgers as typed records: what the planner, the replicas, the driver and
the tests read and write, each field defined once here.

    FileEntry    the manifest's record of one finished output file (`_resflow/manifest/`)
    PartRecord   the record of one finished unit's staged part (`_resflow/units/`)
    UnitResult   what a replica returns for each unit it restored (one row of a Ray Data block)

A record is evidence, not truth: `FileEntry.vouches_for` and `PartRecord.vouches_for` are
the one rule of when an earlier run's work still stands. A record that does not read as
its type (written by an older resflow, or damaged) vouches for nothing: that work is done
again. Adding a field is one edit to its dataclass: JSON and the Arrow schema follow.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from pipeline import storage
from pipeline.contract import OUTPUT_COLUMNS
from pipeline.jobs import RestoreJob
from pipeline.noise import NOISE_BINS

MAX_FAILURES_KEPT = 20  # per unit and per report: the first few reasons, not every failed row


def output_recipe(job: RestoreJob) -> dict:
    """Everything besides the input and the model that decides an output's rows: which
    columns hold the id and the image, the decode limits (what fails or is skipped), the
    columns restore adds and which rows it leaves untouched. An output or part made under
    another recipe is redone (a rerun with another --image-column or --skip-below, or
    after the output contract grew)."""
    return {"columns": list(OUTPUT_COLUMNS), "skip_below": job.settings.skip_below,
            "id_column": job.columns.id, "image_column": job.columns.image, "limits": asdict(job.limits)}


def _from_json(cls, record):
    """`cls` from a stored JSON object, or None when it does not read as one."""
    try:
        return cls(**record)
    except TypeError:  # not an object, a field missing or unknown: another resflow's record, or a damaged one
        return None


@dataclass(frozen=True)
class FileEntry:
    """One input file restored into one output file by one model version under one recipe."""

    input: str
    input_etag: str
    input_size: int
    output: str
    output_etag: str
    output_size: int
    model_version: str
    recipe: dict  # output_recipe() of the run that wrote it
    rows: int
    ok: int
    failed: int
    skipped: int
    finished: str  # ISO time, UTC
    parts: int = 1  # units assembled into the output
    transient: int = 0  # of the failed rows, those that failed for a reason that can pass (contract.TRANSIENT)
    attempts: int = 1  # runs that have restored those rows: the first, then one per retry

    from_json = classmethod(_from_json)

    def to_json(self) -> dict:
        return asdict(self)

    def retry_due(self, retries: int) -> bool:
        """Rows failed for a reason that can pass, and fewer than `retries` retries so far."""
        return self.transient > 0 and self.attempts <= retries

    def vouches_for(self, input: storage.FileInfo, model_version: str, recipe: dict,
                    output: storage.FileInfo | None) -> bool:
        """The input is restored: the same input, model and recipe, and its output still
        exists exactly as written."""
        return (self.input_etag == input.etag and self.input_size == input.size
                and self.model_version == model_version and self.recipe == recipe
                and output is not None and self.output_etag == output.etag and self.output_size == output.size)


@dataclass(frozen=True)
class PartRecord:
    """One unit of a multi-unit file, restored into a staged part that waits for assembly."""

    part: str  # the part's URI
    part_etag: str
    input_etag: str
    model_version: str
    recipe: dict
    rows: int
    ok: int
    failed: int
    skipped: int
    transient: int = 0  # of the failed rows, those that can pass

    from_json = classmethod(_from_json)

    def to_json(self) -> dict:
        return asdict(self)

    def vouches_for(self, target: str, input: storage.FileInfo, model_version: str, recipe: dict,
                    part: storage.FileInfo | None) -> bool:
        """The unit is restored: its part still exists exactly as written, from the same input, model and recipe."""
        return (part is not None and self.part == target and self.part_etag == part.etag
                and self.input_etag == input.etag and self.model_version == model_version and self.recipe == recipe)


STAGES = ("read", "decode", "noise", "forward", "encode", "write")


@dataclass
class UnitResult:
    """A replica's account of one unit: where its output went and what its rows came to.
    Filled in while the unit is restored; travels to the driver as one Arrow row."""

    key: str  # the input file's key (planning.Unit.key)
    index: int  # the unit's place among its file's units
    replica: str = ""  # host:pid of the replica that restored it
    output_etag: str = ""
    output_size: int = 0
    rows: int = 0  # rows written to the output: restored by this run, or carried from the earlier output
    ok: int = 0  # of the rows this run restored: ok, failed, skipped
    failed: int = 0
    skipped: int = 0
    transient: int = 0  # of the failed rows, those that failed for a reason that can pass
    carried: int = 0  # rows a retry copied unchanged from the earlier output (replica.py, `heal`)
    per_channel: int = 0  # colour rows a gray model restored one channel at a time
    megapixels: float = 0.0
    failures: list[list[str]] = field(default_factory=list)  # [image id, reason], the first MAX_FAILURES_KEPT
    noise_counts: list[int] = field(default_factory=lambda: [0] * NOISE_BINS)  # rows per noise bin (pipeline/noise.py)
    stages: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))  # busy seconds per stage
    started: float = 0.0  # when the replica began and ended the unit (epoch seconds)
    finished: float = 0.0

    def fail(self, image_id: str, reason: str) -> None:
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append([image_id, reason])

    @classmethod
    def from_row(cls, row: dict) -> "UnitResult":
        """The inverse of a row of `arrow_schema(UnitResult)` (Arrow maps read back as pairs)."""
        return cls(**{**row, "stages": dict(row["stages"])})


def arrow_type(hint) -> pa.DataType:
    """The Arrow type of a record field's type hint (str, int, float, lists and dicts of them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return pa.list_(arrow_type(args[0]))
    if origin is dict:
        return pa.map_(arrow_type(args[0]), arrow_type(args[1]))
    return {str: pa.string(), int: pa.int64(), float: pa.float64()}[hint]


def arrow_schema(cls) -> pa.Schema:
    hints = typing.get_type_hints(cls)
    return pa.schema([(item.name, arrow_type(hints[item.name])) for item in dataclasses.fields(cls)])
