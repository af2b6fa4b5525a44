"""Reruns that heal: rows that failed for a reason that can pass are restored again by later
runs, up to a bound, without redoing their file's other rows; rows that failed for a reason
in their data stay failed. Against SeaweedFS and local Ray, and in-process."""

import errno
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.config import RestoreSettings
from pipeline.contract import is_transient
from pipeline.dataset import read_table
from pipeline.images import read_can_pass
from pipeline.inference import ImageRestorer, out_of_memory
from pipeline.jobs import RestoreJob
from pipeline.manifest import Manifest
from pipeline.restore import format_report, restore_dataset
from pipeline.restore.records import FileEntry
from tests.conftest import shared_data

PATH_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def path_dataset(ids: list[str], paths: list[str | None], data: list[bytes | None]) -> bytes:
    """A Hugging Face style Parquet file: image structs holding bytes, or only a path."""
    values = pa.array([{"bytes": value, "path": path} for value, path in zip(data, paths)], PATH_IMAGE)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"image_id": ids, "image": values}), sink)
    return sink.getvalue().to_pybytes()


def output_rows(output: str) -> dict:
    table = pa.concat_tables([read_table(info.uri) for info in storage.list_files(output)])
    return {row["image_id"]: row for row in table.to_pylist()}


def entry_of(output: str, key: str) -> FileEntry:
    return FileEntry.from_json(Manifest(output, "manifest").all()[key])


def test_a_missing_image_file_is_retried_once_it_exists_and_the_other_rows_are_kept(ray_local, trained_model,
                                                                                        s3_prefix):
    """A `path` row whose file is not there yet fails for a reason that can pass; once the
    file exists, the next run restores that row alone (on Ray), carrying the others
    byte for byte, and the run after has nothing to do."""
    images = {name: (shared_data("Set12") / f"0{n}.png").read_bytes() for n, name in ((1, "a"), (2, "b"), (3, "c"))}
    for name in ("a", "b"):
        storage.write_bytes(f"{s3_prefix}/data/images/{name}.png", images[name])
    storage.write_bytes(f"{s3_prefix}/data/part-0.parquet",
                        path_dataset(["a", "b", "c"], [f"images/{name}.png" for name in "abc"], [None] * 3))
    job = RestoreJob(input=f"{s3_prefix}/data", output=f"{s3_prefix}/out", model=trained_model, executor="ray",
                     workers=1, cpus_per_worker=0.5, settings=RestoreSettings(batch_size=2), stall_timeout_s=300)

    first = restore_dataset(job)
    before = output_rows(job.output)
    assert (first.images_ok, first.images_failed, first.images_failed_transient) == (2, 1, 1)
    assert before["c"]["status"] == "failed" and is_transient(before["c"]["error"]), before["c"]["error"]
    assert "images/c.png" in before["c"]["error"]
    assert (entry_of(job.output, "part-0.parquet").transient, entry_of(job.output, "part-0.parquet").attempts) == (1, 1)
    assert "1 row(s) failed for a reason that can pass" in format_report(first.to_dict())

    storage.write_bytes(f"{s3_prefix}/data/images/c.png", images["c"])
    second = restore_dataset(job)
    after = output_rows(job.output)
    assert (second.files_retried, second.images_retried, second.images_total) == (1, 1, 1)
    assert (second.images_ok, second.images_failed) == (1, 0)  # the two good rows were not restored again
    assert list(after) == ["a", "b", "c"]
    assert after["c"]["status"] == "ok" and after["c"]["error"] is None
    for name in ("a", "b"):
        assert after[name] == before[name]  # carried byte for byte
    entry = entry_of(job.output, "part-0.parquet")
    assert (entry.ok, entry.failed, entry.transient, entry.attempts, entry.rows) == (3, 0, 0, 2, 3)

    third = restore_dataset(job)
    assert third.files_restored == 0 and third.files_skipped == 1 and third.images_retried == 0


def test_data_failures_stay_failed_and_retries_stop_at_the_bound(trained_model, tmp_path):
    """A corrupt image is never retried; a file that stays missing is retried by `retries`
    later runs, then left failed, and the run says so."""
    good = (shared_data("Set12") / "04.png").read_bytes()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "part-0.parquet").write_bytes(path_dataset(
        ["good", "corrupt", "missing", "loop"], [None, None, "images/missing.png", "images/loop-a.png"],
        [good, good[:60] + b"\x00" * 200, None, None]))
    (tmp_path / "data" / "images").mkdir()
    (tmp_path / "data" / "images" / "loop-a.png").symlink_to(tmp_path / "data" / "images" / "loop-b.png")
    (tmp_path / "data" / "images" / "loop-b.png").symlink_to(tmp_path / "data" / "images" / "loop-a.png")
    job = RestoreJob(input=str(tmp_path / "data"), output=str(tmp_path / "out"), model=trained_model, retries=2)

    first = restore_dataset(job)
    rows = output_rows(job.output)
    assert (first.images_ok, first.images_failed, first.images_failed_transient) == (1, 3, 1)
    assert [is_transient(rows[name]["error"]) for name in ("corrupt", "missing", "loop")] == [False, True, False]
    corrupt_error = rows["corrupt"]["error"]

    for attempt in (2, 3):
        again = restore_dataset(job)
        assert (again.files_retried, again.images_retried, again.images_failed_transient) == (1, 1, 1), attempt
        assert entry_of(job.output, "part-0.parquet").attempts == attempt
        assert output_rows(job.output)["corrupt"]["error"] == corrupt_error
        assert output_rows(job.output)["good"] == rows["good"]

    spent = restore_dataset(job)
    assert spent.files_restored == 0 and spent.images_retried == 0 and spent.retries_spent == 1
    assert "used up their retries" in format_report(spent.to_dict())
    entry = entry_of(job.output, "part-0.parquet")
    assert (entry.ok, entry.failed, entry.transient, entry.attempts) == (1, 3, 1, 3)

    redone = restore_dataset(replace(job, force=True))  # --force restores everything again
    assert redone.files_restored == 1 and redone.images_failed == 3


def test_what_can_pass_is_told_from_what_cannot(trained_model, monkeypatch):
    """Missing, not permitted and storage errors can pass; a path no file system takes cannot.
    Out of memory in the forward pass can pass; a model that cannot take the image cannot."""
    assert read_can_pass(FileNotFoundError(errno.ENOENT, "gone")) and read_can_pass(PermissionError(errno.EACCES, "no"))
    assert read_can_pass(storage.StorageError("reading s3://x failed after 9 attempts"))
    assert not read_can_pass(OSError(errno.ELOOP, "loop")) and not read_can_pass(OSError(errno.ENAMETOOLONG, "long"))
    assert not read_can_pass(IsADirectoryError(errno.EISDIR, "a folder"))
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory")) and out_of_memory(MemoryError())
    assert not out_of_memory(ValueError("a 3-channel model cannot restore a 1-channel image"))

    restorer = ImageRestorer(trained_model, RestoreSettings(batch_size=2))
    image = (shared_data("Set12") / "05.png").read_bytes()
    for raised, can_pass in ((MemoryError("no room"), True), (ValueError("cannot take it"), False)):
        def fail(*images, raised=raised):
            raise raised
        monkeypatch.setattr(restorer, "restore_pixels", fail)
        out = restorer({"image": np.array([image, image], dtype=object)})
        assert list(out["status"]) == ["failed", "failed"]
        assert [is_transient(error) for error in out["error"]] == [can_pass] * 2
