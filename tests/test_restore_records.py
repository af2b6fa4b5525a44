"""The restore's ledgers (pipeline/restore/records.py) and what planning makes of them: fast,
local storage, no Ray."""

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.contract import DecodeLimits, ImageColumns
from pipeline.images import encode_png
from pipeline.jobs import RestoreJob
from pipeline.manifest import SNAPSHOT, Manifest
from pipeline.modelio import save_model
from pipeline.models import build_model
from pipeline.restore import plan
from pipeline.restore.records import FileEntry, PartRecord, UnitResult, arrow_schema, output_recipe


@pytest.fixture
def restored_once(tmp_path) -> RestoreJob:
    """An input file, its output, and a manifest entry that vouches for it (as a finished run leaves them)."""
    png = encode_png(np.full((16, 16), 128, np.uint8), "L")
    table = pa.table({"image_id": ["a"], "name": ["first"], "image": pa.array([png], pa.binary()), "other": pa.array([png], pa.binary())})
    pq.write_table(table, tmp_path / "in.parquet")
    (tmp_path / "input").mkdir()
    pq.write_table(table, tmp_path / "input" / "a.parquet")
    model = str(tmp_path / "model")
    card = save_model(model, build_model("dncnn", depth=3, width=4), version="v1")
    job = RestoreJob(input=str(tmp_path / "input"), output=str(tmp_path / "output"), model=model)
    pq.write_table(table, tmp_path / "output.parquet")
    storage.write_bytes(storage.join(job.output, "a.parquet"), (tmp_path / "output.parquet").read_bytes())
    source, output = storage.list_files(job.input)[0], storage.list_files(job.output)[0]
    entry = FileEntry(input=source.uri, input_etag=source.etag, input_size=source.size, output=output.uri,
                      output_etag=output.etag, output_size=output.size, model_version=card.version,
                      recipe=output_recipe(job), rows=1, ok=1, failed=0, skipped=0, finished="2026-12-06T00:00:00")
    Manifest(job.output).put_many({"a.parquet": entry.to_json()})
    return job


def test_an_entry_vouches_for_its_file_until_the_recipe_changes(restored_once):
    """What changes the output's rows is in the recipe: the image and id columns and the
    decode limits as well as skip_below, so a rerun that changes one restores again."""
    assert [len(plan(restored_once).files), len(plan(restored_once).skipped)] == [0, 1]
    for changed in (replace(restored_once, columns=ImageColumns(image="other")),
                    replace(restored_once, columns=ImageColumns(id="name")),
                    replace(restored_once, limits=DecodeLimits(max_pixels=1000)),
                    replace(restored_once, settings=replace(restored_once.settings, skip_below=5.0))):
        assert len(plan(changed).files) == 1, changed


@pytest.mark.parametrize("damage", ["truncated batch", "snapshot not JSON", "entry a list"])
def test_a_damaged_record_never_blocks_a_rerun_and_is_named(restored_once, damage):
    manifest = Manifest(restored_once.output)
    if damage == "truncated batch":
        name = storage.join(manifest.folder, "batches", "00000000000000000001-damaged.json")
        storage.write_bytes(name, b'{"a.parquet": {"input": "trunc')
    elif damage == "snapshot not JSON":
        manifest.compact()  # the entry now lives in the snapshot
        name = storage.join(manifest.folder, SNAPSHOT)
        storage.write_bytes(name, b"\x00\xff garbage")
    else:
        name = storage.join(manifest.folder, "entries", "b.parquet.json")
        storage.write_bytes(name, b"[1, 2]")
    planned = plan(restored_once)  # no exception: the damage is noted, not fatal
    assert len(planned.files) + len(planned.skipped) == 1
    assert any(note.startswith(name) for note in planned.damaged), planned.damaged
    if damage == "snapshot not JSON":
        assert len(planned.files) == 1  # what it vouched for is done again
        manifest.compact()  # the next run's compaction replaces it
        assert manifest.all() == {} and manifest.damaged == []


def test_records_travel_as_json_and_arrow_and_a_foreign_record_vouches_for_nothing():
    record = PartRecord(part="p", part_etag="e", input_etag="i", model_version="v", recipe={}, rows=1, ok=1,
                        failed=0, skipped=0)
    assert PartRecord.from_json(record.to_json()) == record
    assert PartRecord.from_json({**record.to_json(), "unknown": 1}) is None
    assert FileEntry.from_json({"input": "x"}) is None and FileEntry.from_json(None) is None
    result = UnitResult("k", 0, replica="h:1", rows=2, failures=[["a", "why"]], stages={"read": 1.5})
    table = pa.Table.from_pylist([result.__dict__], schema=arrow_schema(UnitResult))
    assert UnitResult.from_row(table.to_pylist()[0]) == result



def test_the_report_counts_a_replicas_waits_between_units_and_not_their_overlaps():
    """`replica_idle_seconds`: per replica, from each unit's end to the next one's start when
    nothing else of that replica's was under way; units that overlap count as no wait."""
    from pipeline.restore.report import RestoreReport, format_report

    report = RestoreReport("s3://b/out", "v1", executor="ray")
    spans = {"h:1": [(0.0, 1.0), (1.5, 2.0), (2.0, 3.0)],  # waited 0.5
             "h:2": [(0.0, 2.0), (1.0, 3.0), (2.5, 4.0), (4.25, 5.0)]}  # two at once, then waited 0.25
    for replica, units in spans.items():
        for index, (started, finished) in enumerate(units):
            report.add(UnitResult("k", index, replica=replica, rows=1, ok=1, started=started, finished=finished))
    assert report.replica_idle_seconds == pytest.approx(0.75)
    assert report.most_units_at_once == 2
    assert report.replica_tail_seconds == pytest.approx(2.0)  # h:2 ended 2 s after h:1
    assert "2 replica(s) waited 0.8 s in all between their units" in format_report(report.to_dict())

def test_an_input_deleted_since_a_run_is_reported_and_removed_only_with_prune(restored_once):
    from pipeline.restore.driver import prune_inputs_gone

    job, output = restored_once, storage.join(restored_once.output, "a.parquet")
    source = storage.join(job.input, "a.parquet")
    storage.write_bytes(storage.join(job.input, "b.parquet"), storage.read_bytes(source))  # the input stays a dataset
    part = storage.join(job.output, storage.RESFLOW_DIR, "parts", "a.parquet", "0123", "000000-000000.parquet")
    storage.write_bytes(part, b"a staged part of a run that never finished")
    Manifest(job.output, "units").put_many({"a.parquet/000000-000000": {"part": part}})
    storage.delete(source)
    planned = plan(job)
    assert (planned.gone, planned.gone_units) == (["a.parquet"], ["a.parquet/000000-000000"])
    assert storage.exists(output)  # planning only reports
    assert prune_inputs_gone(job, planned.gone, planned.gone_units) == 1
    assert not storage.exists(output) and not storage.exists(part)
    assert "a.parquet" not in Manifest(job.output).all() and Manifest(job.output, "units").all() == {}
    assert plan(job).gone == []


def test_prune_touches_only_what_the_manifest_recorded_inside_the_output(restored_once, tmp_path):
    """A file put into the output by hand is not an input gone; a record whose key or output
    points outside the output, or whose output changed since, deletes nothing but itself."""
    from pipeline.restore.driver import prune_inputs_gone

    job = restored_once
    storage.write_bytes(storage.join(job.input, "b.parquet"), storage.read_bytes(storage.join(job.input, "a.parquet")))
    foreign = storage.join(job.output, "by-hand.parquet")
    storage.write_bytes(foreign, storage.read_bytes(storage.join(job.output, "a.parquet")))
    outside = str(tmp_path / "outside.parquet")
    storage.write_bytes(outside, b"not resflow's")
    entry = FileEntry.from_json(Manifest(job.output).all()["a.parquet"])
    escaping = replace(entry, input=storage.join(job.input, "../x.parquet"), output=outside,
                       output_etag=storage.file_info(outside).etag)
    Manifest(job.output).put_many({"../outside.parquet": escaping.to_json(),
                                   "gone.parquet": replace(entry, input=storage.join(job.input, "gone.parquet"),
                                                           output=outside).to_json()})
    storage.write_bytes(storage.join(job.output, "a.parquet"), b"changed since it was recorded")
    storage.delete(storage.join(job.input, "a.parquet"))
    planned = plan(job)
    assert planned.gone == ["a.parquet", "gone.parquet"]  # not the file by hand, not the foreign input's record
    prune_inputs_gone(job, planned.gone, planned.gone_units)
    assert storage.exists(foreign) and storage.exists(outside)
    assert storage.exists(storage.join(job.output, "a.parquet"))  # changed since recorded: kept
    assert set(Manifest(job.output).all()) == {"../outside.parquet"}
