"""Planning a restore: which input files to restore, cut into which units of work.

Work is cut into units of whole row groups (at most `unit_rows` rows and `unit_megabytes`
of compressed input each, read from the footers), so one large file spreads over every
replica. A file is done when its manifest entry vouches for it (records.FileEntry); of a
file not done, a unit is done when its part record vouches for it (records.PartRecord).
A done file whose entry counts rows that failed for a reason that can pass is retried
(`plan_retry`), up to `RestoreJob.retries` times.
Planning reads one listing of each prefix and the manifests, and footers only of the
files to restore.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline import registry, storage
from pipeline.dataset import check_footers, dataset_files, read_footers
from pipeline.jobs import RestoreJob
from pipeline.manifest import Manifest
from pipeline.modelio import load_model
from pipeline.restore.records import FileEntry, PartRecord, output_recipe

SPLIT_AT_LEAST = 8  # a file too large for one unit is cut into this many at least (or one per row group)


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
    # A retry of a finished file (count == 1, target its output): how many of its rows failed
    # for a reason that can pass; those are restored again, the rest carried (replica.py).
    heal_rows: int = 0

    @property
    def name(self) -> str:
        return f"{self.key}/{self.first:06d}-{self.last:06d}"

    @property
    def rows_to_restore(self) -> int:
        return self.heal_rows or self.rows


@dataclass
class FilePlan:
    info: storage.FileInfo
    key: str
    output: str
    rows: int
    units: list[Unit]
    done: dict[int, PartRecord] = field(default_factory=dict)  # unit index -> part record of an earlier run
    earlier: FileEntry | None = None  # a retry: the entry of the output whose failed rows are restored again


@dataclass
class RestorePlan:
    files: list[FilePlan]  # to restore: new, changed, or not done by this model version (all with force)
    skipped: list[storage.FileInfo]  # done for this model version, outputs unchanged
    model_folder: str
    model_version: str
    damaged: list[str] = field(default_factory=list)  # records that could not be read: their work is redone
    # Inputs deleted since an earlier run (their keys) whose output or records remain, and
    # those records' unit names: reported, and removed with RestoreJob.prune.
    gone: list[str] = field(default_factory=list)
    gone_units: list[str] = field(default_factory=list)
    # Rows of done files that failed for a reason that can pass and have used up their retries.
    retries_spent: int = 0

    @property
    def todo(self) -> list[storage.FileInfo]:
        return [file.info for file in self.files]

    @property
    def rows(self) -> dict[str, int]:
        return {file.info.uri: file.rows for file in self.files}


def output_uri(job: RestoreJob, input_info: storage.FileInfo) -> str:
    """The input's path relative to the input prefix, under the output prefix."""
    return storage.join(job.output, storage.relative_path(job.input, input_info.uri))


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


def existing_files(prefix: str) -> list[storage.FileInfo]:
    """Every Parquet file under `prefix` (one listing), or none when it does not exist yet."""
    try:
        return storage.list_files(prefix)
    except FileNotFoundError:
        return []


def plan_units(job: RestoreJob, key: str, info: storage.FileInfo, footer: pq.FileMetaData,
               model_version: str) -> FilePlan:
    """One file to restore, cut into units: the file's output itself when one unit, staged parts when more."""
    bounds = split_into_units(footer, job.unit_rows, int(job.unit_megabytes * 2**20))
    folder = part_folder(job, key, info, model_version)
    output = output_uri(job, info)
    units = [Unit(key, info.uri, first, last, rows, index, len(bounds),
                  output if len(bounds) == 1 else storage.join(folder, f"{first:06d}-{last:06d}.parquet"))
             for index, (first, last, rows) in enumerate(bounds)]
    return FilePlan(info, key, output, footer.num_rows, units)


def plan_retry(key: str, info: storage.FileInfo, entry: FileEntry) -> FilePlan:
    """A finished file with rows that failed for a reason that can pass: one unit that
    restores those rows again into a new output, carrying the others (replica.py)."""
    unit = Unit(key, info.uri, 0, entry.parts - 1, entry.rows, 0, 1, entry.output, heal_rows=entry.transient)
    return FilePlan(info, key, entry.output, entry.rows, [unit], earlier=entry)


def restored_from(input_uri: str, record: dict | None) -> bool:
    """A manifest record is a valid entry written for an input file inside `input_uri`."""
    entry = FileEntry.from_json(record)
    return entry is not None and storage.contains(input_uri, entry.input)


def plan(job: RestoreJob) -> RestorePlan:
    """Everything that can be checked before any work: input and output apart, the model
    loads, the input is not empty, every file to restore has the contract's columns; and
    what is left to do, by the records of earlier runs (records.py)."""
    storage.check_disjoint(job.input, job.output)
    model_folder = registry.resolve(job.model)
    _, card = load_model(model_folder)
    recipe = output_recipe(job)
    manifest, units_manifest = Manifest(job.output, "manifest"), Manifest(job.output, "units")
    entries = manifest.all()
    outputs = {storage.relative_path(job.output, info.uri): info for info in existing_files(job.output)}
    todo, skipped, retries, present = [], [], [], set()
    for info in dataset_files(job.input):
        key = storage.relative_path(job.input, info.uri)
        present.add(key)
        entry = FileEntry.from_json(entries.get(key))
        done = entry is not None and entry.vouches_for(info, card.version, recipe, outputs.get(key))
        if done and not job.force and entry.retry_due(job.retries):
            retries.append(plan_retry(key, info, entry))
        else:
            (skipped if done and not job.force else todo).append((key, info, entry if done else None))
    footers = read_footers([info for _, info, _ in todo])
    check_footers([info for _, info, _ in todo], footers, job.columns)  # done files' footers are never read
    all_records = units_manifest.all()
    records = all_records if not job.force else {}
    parts = {info.uri: info for info in existing_files(storage.join(job.output, storage.RESFLOW_DIR, "parts"))}
    files = [plan_units(job, key, info, footer, card.version) for (key, info, _), footer in zip(todo, footers)]
    for file in files:
        for unit in file.units if len(file.units) > 1 else []:
            record = PartRecord.from_json(records.get(unit.name))
            if record is not None and record.vouches_for(unit.target, file.info, card.version, recipe,
                                                         parts.get(unit.target)):
                file.done[unit.index] = record
    # Only what this input's earlier runs recorded is theirs: a file put into the output by
    # hand, or recorded from another input, is never reported (nor pruned) as gone.
    gone = sorted(key for key, value in entries.items() if key not in present and restored_from(job.input, value))
    gone_units = sorted(name for name in all_records if name.rsplit("/", 1)[0] not in present)
    return RestorePlan(files + retries, [info for _, info, _ in skipped], model_folder, card.version,
                       manifest.damaged + units_manifest.damaged, gone, gone_units,
                       retries_spent=sum(entry.transient for _, _, entry in skipped if entry is not None))
