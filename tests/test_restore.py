"""Ray Data batch restoration against SeaweedFS and local Ray."""

import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import metrics, s3server, storage
from pipeline.dataset import DatasetError, Manifest, read_table
from pipeline.degrade import Degradation
from pipeline.images import SchemaError, decode, encode_png
from pipeline.ingest import degrade_dataset, ingest
from pipeline.modelio import ModelLoadError
from pipeline.restore import RestoreJob, StallError, restore_dataset
from tests.conftest import shared_data
from tests.test_images import bad_values


def job(input_uri, output_uri, model, **overrides) -> RestoreJob:
    settings = dict(workers=2, cpus_per_worker=0.5, batch_size=4, progress=False, stall_timeout_s=300)
    settings.update(overrides)
    return RestoreJob(input=input_uri, output=output_uri, model=model, **settings)


def rows(uri: str) -> pa.Table:
    return pa.concat_tables([read_table(info.uri) for info in storage.list_files(uri)])


@pytest.fixture(scope="module")
def noisy_set12(s3_server):
    root = f"s3://tests/restore-set12-{time.time_ns()}"
    ingest(str(shared_data("Set12")), root + "/clean", rows_per_file=4, progress=False)
    degrade_dataset(root + "/clean", root + "/noisy", Degradation(noise_sigma=25), progress=False)
    return root + "/noisy"


def test_restore_set12_improves_psnr_and_keeps_rows(ray_local, noisy_set12, trained_model, s3_prefix):
    report = restore_dataset(job(noisy_set12, s3_prefix, trained_model))
    assert (report.files_restored, report.images_ok, report.images_failed) == (3, 12, 0)
    assert [f.uri.rsplit("/", 1)[1] for f in storage.list_files(s3_prefix)] == \
        [f.uri.rsplit("/", 1)[1] for f in storage.list_files(noisy_set12)]  # one output per input, same names
    out, source = rows(s3_prefix), rows(noisy_set12)
    assert out["image_id"].to_pylist() == source["image_id"].to_pylist()  # same rows, same order, no duplicates
    assert set(out.column_names) == {"image_id", "image", "target", "status", "error", "model_version"}
    before = [metrics.psnr(decode(t).pixels, decode(i).pixels) for i, t in zip(source["image"].to_pylist(), source["target"].to_pylist())]
    after = [metrics.psnr(decode(t).pixels, decode(i).pixels) for i, t in zip(out["image"].to_pylist(), out["target"].to_pylist())]
    assert np.mean(after) > np.mean(before) + 3
    assert report.megapixels == pytest.approx(sum(decode(v).pixels.size for v in out["image"].to_pylist()) / 1e6)
    assert 0 < report.first_rows_seconds <= report.seconds


def test_rerun_is_a_noop_and_only_new_files_are_restored(ray_local, noisy_set12, trained_model, s3_prefix):
    restore_dataset(job(noisy_set12, s3_prefix, trained_model))
    again = restore_dataset(job(noisy_set12, s3_prefix, trained_model))
    assert (again.files_restored, again.files_skipped) == (0, 3)
    extra = f"{s3_prefix}-input"
    for info in storage.list_files(noisy_set12):
        storage.write_bytes(storage.join(extra, info.uri.rsplit("/", 1)[1]), storage.read_bytes(info.uri))
    restore_dataset(job(extra, s3_prefix + "-out", trained_model))
    table = read_table(storage.list_files(noisy_set12)[0].uri).slice(0, 2)
    pq.write_table(table.set_column(0, "image_id", pa.array(["new-a", "new-b"])), "/tmp/new.parquet")
    storage.write_bytes(storage.join(extra, "part-00099.parquet"), open("/tmp/new.parquet", "rb").read())
    third = restore_dataset(job(extra, s3_prefix + "-out", trained_model))
    assert (third.files_restored, third.files_skipped, third.images_ok) == (1, 3, 2)
    assert len(rows(s3_prefix + "-out")) == 14
    forced = restore_dataset(job(extra, s3_prefix + "-out", trained_model, force=True))
    assert forced.files_restored == 4 and len(rows(s3_prefix + "-out")) == 14


def test_corrupt_rows_are_failed_with_reasons(ray_local, trained_model, tmp_path):
    good = (shared_data("Set12") / "01.png").read_bytes()
    bad = bad_values()
    ids = ["good-1"] + list(bad) + ["good-2"]
    pq.write_table(pa.table({"image_id": ids, "image": pa.array([good] + [v for v, _ in bad.values()] + [good], pa.binary())}),
                   tmp_path / "in.parquet")
    report = restore_dataset(job(str(tmp_path), str(tmp_path / "out"), trained_model))
    assert (report.images_ok, report.images_failed) == (2, len(bad))
    out = rows(str(tmp_path / "out"))
    status = dict(zip(out["image_id"].to_pylist(), out["status"].to_pylist()))
    errors = dict(zip(out["image_id"].to_pylist(), out["error"].to_pylist()))
    assert status["good-1"] == status["good-2"] == "ok" and errors["good-1"] is None
    for name, (_, reason) in bad.items():
        assert status[name] == "failed" and reason in errors[name]


def test_tiled_restore_of_a_large_image_matches_whole(ray_local, trained_model, tmp_path):
    rng = np.random.default_rng(3)
    tiles = [np.asarray(decode((shared_data("BSD68") / f"test00{i}.png").read_bytes()).pixels) for i in (1, 2)]
    large = np.concatenate([tiles[0][:300, :460], tiles[1][:300, :460]], axis=0)  # 600 x 460
    noisy = np.clip(large + rng.normal(0, 25, large.shape), 0, 255).round().astype(np.uint8)
    pq.write_table(pa.table({"image_id": ["large"], "image": [encode_png(noisy, "L")]}), tmp_path / "in.parquet")
    restore_dataset(job(str(tmp_path), str(tmp_path / "whole"), trained_model, tile=1024, tile_overlap=0))
    restore_dataset(job(str(tmp_path), str(tmp_path / "tiled"), trained_model, tile=128, tile_overlap=32))
    whole = decode(rows(str(tmp_path / "whole"))["image"][0].as_py()).pixels.astype(int)
    tiled = decode(rows(str(tmp_path / "tiled"))["image"][0].as_py()).pixels.astype(int)
    assert np.abs(whole - tiled).max() <= 1


def test_hugging_face_parquet_input(ray_local, trained_model, tmp_path):
    datasets = pytest.importorskip("datasets")
    paths = sorted(shared_data("Set12").glob("*.png"))[:3]
    dataset = datasets.Dataset.from_dict(
        {"image_id": [p.name for p in paths], "image": [{"bytes": p.read_bytes(), "path": p.name} for p in paths],
         "caption": ["a", "b", "c"]}).cast_column("image", datasets.Image())
    (tmp_path / "hf").mkdir()
    dataset.to_parquet(str(tmp_path / "hf" / "data.parquet"))
    report = restore_dataset(job(str(tmp_path / "hf"), str(tmp_path / "out"), trained_model))
    assert report.images_ok == 3
    out = rows(str(tmp_path / "out"))
    assert out["caption"].to_pylist() == ["a", "b", "c"]
    assert decode(out["image"][0].as_py()).pixels.shape == decode(paths[0].read_bytes()).pixels.shape


def test_other_columns_pass_through_with_their_types(ray_local, trained_model, tmp_path):
    """Replicas read and write Arrow directly: a column resflow does not touch keeps its type
    and values (timestamps, lists, structs, dictionaries), and input row groups stay row groups."""
    good = (shared_data("Set12") / "01.png").read_bytes()
    count = 5
    table = pa.table({
        "image_id": [f"r{i}" for i in range(count)],
        "taken": pa.array([1_700_000_000_000_000 + i for i in range(count)], pa.timestamp("us", tz="UTC")),
        "image": pa.array([good] * count, pa.binary()),
        "tags": pa.array([["a", str(i)] for i in range(count)], pa.list_(pa.string())),
        "box": pa.array([{"x": i, "y": 2.5} for i in range(count)], pa.struct([("x", pa.int16()), ("y", pa.float32())])),
        "camera": pa.array(["nikon", "canon", "nikon", None, "canon"]).dictionary_encode(),
    })
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=2)  # 3 row groups: 2 + 2 + 1
    restore_dataset(job(str(tmp_path), str(tmp_path / "out"), trained_model, batch_size=4))
    out_file = pq.ParquetFile(tmp_path / "out" / "in.parquet")
    out = out_file.read()
    assert out.column_names == [*table.column_names, "status", "error", "model_version"]
    for name in ("image_id", "taken", "tags", "box", "camera"):
        assert out.schema.field(name).type == table.schema.field(name).type, name
        assert out[name].to_pylist() == table[name].to_pylist(), name
    assert out_file.num_row_groups == 3 and set(out["status"].to_pylist()) == {"ok"}


def test_bad_input_stops_before_any_work(trained_model, tmp_path):
    pq.write_table(pa.table({"image_id": ["a"], "picture": [b"x"]}), tmp_path / "missing.parquet")
    with pytest.raises(SchemaError, match="no image column 'image'"):
        restore_dataset(job(str(tmp_path), str(tmp_path / "out"), trained_model))
    (tmp_path / "missing.parquet").unlink()
    pq.write_table(pa.table({"image_id": ["a"], "image": [3]}), tmp_path / "typed.parquet")
    with pytest.raises(SchemaError, match="'image' has type int64"):
        restore_dataset(job(str(tmp_path), str(tmp_path / "out"), trained_model))
    with pytest.raises(DatasetError, match="no Parquet files"):
        restore_dataset(job(str(tmp_path / "nothing"), str(tmp_path / "out"), trained_model))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("model.json",):
        (pickled / name).write_bytes((__import__("pathlib").Path(trained_model) / name).read_bytes())
    torch.save({"w": torch.zeros(1)}, pickled / "model.safetensors")
    (tmp_path / "typed.parquet").unlink()
    pq.write_table(pa.table({"image_id": ["a"], "image": [b"x"]}), tmp_path / "ok.parquet")
    with pytest.raises(ModelLoadError, match="refusing to load"):
        restore_dataset(job(str(tmp_path), str(tmp_path / "out"), str(pickled)))
    assert not (tmp_path / "out").exists()


def test_ray_workers_allocate_arrow_memory_with_the_system_allocator(ray_local):
    import os

    import ray

    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL", "system") != "system":
        pytest.skip("ARROW_DEFAULT_MEMORY_POOL set by the user")

    @ray.remote(num_cpus=0.1)
    def backend() -> str:
        import pyarrow

        return pyarrow.default_memory_pool().backend_name

    assert ray.get(backend.remote()) == "system"


def test_rows_per_model_call_default_to_the_device_and_the_user_wins():
    from pipeline.cli import build_parser
    from pipeline.restore import CPU_BATCH_SIZE, GPU_BATCH_SIZE

    cpu, gpu = RestoreJob("a", "b", "m"), RestoreJob("a", "b", "m", use_gpu=True)
    assert (cpu.rows_per_call, gpu.rows_per_call) == (CPU_BATCH_SIZE, GPU_BATCH_SIZE)
    assert CPU_BATCH_SIZE < GPU_BATCH_SIZE
    assert RestoreJob("a", "b", "m", batch_size=2, use_gpu=True).rows_per_call == 2
    args = build_parser().parse_args(["restore", "--input", "a", "--output", "b", "--model", "m"])
    assert args.batch_size is None  # the CLI leaves the choice to the job, which knows the device
    with pytest.raises(ValueError, match="batch_size"):
        RestoreJob("a", "b", "m", batch_size=0)


def test_stall_fails_with_a_message_and_rerun_completes(ray_local, noisy_set12, trained_model, s3_prefix):
    with pytest.raises(StallError, match="no restored rows for 0 s.*0/3 file"):
        restore_dataset(job(noisy_set12, s3_prefix, trained_model, stall_timeout_s=0.01))
    report = restore_dataset(job(noisy_set12, s3_prefix, trained_model))
    assert report.files_restored + report.files_skipped == 3
    assert len(rows(s3_prefix)) == 12


class _SlowResults:
    """Stands in for a dataset whose first result takes `first_after` seconds."""

    def __init__(self, first_after: float):
        self.first_after = first_after

    def iter_batches(self, **_):
        time.sleep(self.first_after)
        yield "file done"


def test_watchdog_waits_while_rows_are_restored_and_stops_when_they_are_not(monkeypatch):
    """A file can take minutes; the watchdog counts the replicas' restored rows, not files."""
    from pipeline import restore

    monkeypatch.setattr(restore, "PROGRESS_POLL_S", 0.05)
    clock = time.monotonic()
    rising = lambda: int((time.monotonic() - clock) * 100)  # noqa: E731  rows keep coming
    results = restore._batches_with_watchdog(_SlowResults(1.5), 0.5, lambda: "somewhere", rising)
    assert list(results) == ["file done"]  # 3x the stall timeout before the file finished: no stall
    stuck = restore._batches_with_watchdog(_SlowResults(30), 0.5, lambda: "at row 7", lambda: 7)
    started = time.monotonic()
    with pytest.raises(StallError, match="no restored rows for 0 s: at row 7"):
        list(stuck)
    assert time.monotonic() - started < 10


def test_s3_restart_mid_run_loses_and_duplicates_nothing(ray_local, s3_server, trained_model, s3_prefix):
    ingest(str(shared_data("BSD68")), s3_prefix + "/in", rows_per_file=4, progress=False)
    files = storage.list_files(s3_prefix + "/in")
    manifest = Manifest(s3_prefix + "/out", "manifest")
    outcome = {}

    def run():
        try:
            outcome["report"] = restore_dataset(job(s3_prefix + "/in", s3_prefix + "/out", trained_model))
        except Exception as error:
            outcome["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.time() + 240
    while not manifest.all() and time.time() < deadline and worker.is_alive():
        time.sleep(0.5)
    s3server.restart(s3_server.data_dir, down_seconds=3, hard=True)  # a crash and ~10 s outage mid-run
    worker.join(timeout=600)
    assert not worker.is_alive()
    if "error" in outcome:  # a clean failure is allowed; the rerun must finish the job
        restore_dataset(job(s3_prefix + "/in", s3_prefix + "/out", trained_model))
    out = rows(s3_prefix + "/out")
    source_ids = [i for f in files for i in read_table(f.uri, columns=["image_id"])["image_id"].to_pylist()]
    assert sorted(out["image_id"].to_pylist()) == sorted(source_ids)  # every row exactly once
    assert set(out["status"].to_pylist()) == {"ok"}


def test_resflow_restore_runs_local_ray_without_its_dashboard(monkeypatch):
    """`resflow restore` is a process of its own, so its local Ray leaves the dashboard out
    (10 processes, ~210 MB); a restore inside a longer process keeps it for training."""
    import inspect
    import os
    import subprocess
    import sys

    from pipeline import cli, restore

    asked = {}

    def fake_restore(job, log=print, on_progress=None, ray_dashboard=True):
        asked["ray_dashboard"] = ray_dashboard
        return restore.RestoreReport(job.output, "v1")

    monkeypatch.setattr(restore, "restore_dataset", fake_restore)
    assert cli.main(["restore", "--input", "a", "--output", "b", "--model", "m"]) == 0
    assert asked == {"ray_dashboard": False}
    assert inspect.signature(restore_dataset).parameters["ray_dashboard"].default is True

    code = ("import ray; from pipeline import raycluster; raycluster.connect(num_cpus=1, dashboard={}); "
            "print(bool(ray._private.worker.get_dashboard_url())); ray.shutdown()")
    for dashboard in (False, True):
        started = subprocess.run([sys.executable, "-c", code.format(dashboard)], capture_output=True, text=True,
                                 timeout=180, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip().splitlines()[-1] == str(dashboard)
