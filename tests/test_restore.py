"""Ray Data batch restoration against SeaweedFS and local Ray."""

import json
import threading
import time
import uuid
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from local import s3server
from pipeline import metrics, storage
from pipeline.config import RestoreSettings
from pipeline.dataset import DatasetError, read_table
from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation, protocol_noisy
from pipeline.images import SchemaError, decode, encode_png, from_float, to_float
from pipeline.ingest import ingest
from pipeline.jobs import RestoreJob
from pipeline.manifest import Manifest
from pipeline.modelio import ModelLoadError, save_model
from pipeline.models import build_model
from pipeline.restore import StallError, format_report, restore_dataset
from pipeline.restore.driver import CPU_UNITS_AT_ONCE, GPU_UNITS_AT_ONCE
from tests.conftest import shared_data
from tests.test_images import bad_values


def job(input_uri, output_uri, model, batch_size=4, tile=RestoreSettings.tile,
        tile_overlap=RestoreSettings.tile_overlap, **overrides) -> RestoreJob:
    """A restore job for tests: 2 CPU replicas at half a CPU each, 4 rows per call."""
    fields = dict(workers=2, cpus_per_worker=0.5, stall_timeout_s=300)
    fields.update(overrides)
    settings = RestoreSettings(batch_size=batch_size, tile=tile, tile_overlap=tile_overlap)
    return RestoreJob(input=input_uri, output=output_uri, model=model, settings=settings, **fields)


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
    assert set(out.column_names) == {"image_id", "image", "target", "status", "error", "model_version", "noise_sigma"}
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


def multi_frame_png() -> bytes:
    import io

    from PIL import Image

    first, *rest = [Image.fromarray(np.full((16, 16), 60 * i, np.uint8)) for i in range(3)]
    buffer = io.BytesIO()
    first.save(buffer, format="PNG", save_all=True, append_images=rest)
    return buffer.getvalue()


def eps() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buffer, format="EPS")
    return buffer.getvalue()


def corrupt_row_group(path, group: int, column: str) -> None:
    """Overwrite the middle of one column chunk of one row group: the footer still reads."""
    metadata = pq.read_metadata(path)
    chunk = metadata.row_group(group).column(metadata.schema.names.index(column))
    data = bytearray(path.read_bytes())
    begin = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data[begin + 8 : begin + chunk.total_compressed_size - 8] = b"\xaa" * (chunk.total_compressed_size - 16)
    path.write_bytes(bytes(data))


def test_every_bad_row_fails_alone_and_the_rest_succeed(ray_local, trained_model, tmp_path):
    """One job over files holding each kind of bad row next to good ones: every bad row is
    `failed` with its reason, every good row `ok`, and the job itself succeeds. (A valid
    image too small to restore is not a bad row: it is `skipped`.)"""
    good = (shared_data("Set12") / "01.png").read_bytes()
    bad = {**bad_values(), "animated PNG": (multi_frame_png(), "3 frames"),
           "EPS": (eps(), "not one of the accepted formats")}
    tiny = bad.pop("1x1 image")[0]
    source = tmp_path / "in"
    source.mkdir()
    ids = ["good-1"] + list(bad) + ["good-2", "tiny"]
    pq.write_table(pa.table({"image_id": ids, "image": pa.array([good] + [v for v, _ in bad.values()] + [good, tiny],
                                                                 pa.binary())}), source / "a-values.parquet")
    # ids: null and not UTF-8 (a string column holding raw bytes, as some writers produce)
    raw_ids = pa.array([b"good-3", None, b"\xff\xfe-latin"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"image_id": raw_ids, "image": pa.array([good] * 3, pa.binary())}), source / "b-ids.parquet")
    # an image struct whose bytes field holds text
    text_bytes = pa.array([{"bytes": "iVBORw0KGgo=", "path": None}, {"bytes": None, "path": None}],
                          pa.struct([("bytes", pa.string()), ("path", pa.string())]))
    pq.write_table(pa.table({"image_id": ["text-bytes", "neither"], "image": text_bytes}), source / "c-struct.parquet")
    # a row group whose bytes are corrupt, between two good ones
    pq.write_table(pa.table({"image_id": [f"group-{i}" for i in range(6)], "image": pa.array([good] * 6, pa.binary())}),
                   source / "d-groups.parquet", row_group_size=2)
    corrupt_row_group(source / "d-groups.parquet", 1, "image")

    report = restore_dataset(job(str(source), str(tmp_path / "out"), trained_model))
    out = rows(str(tmp_path / "out"))
    status = out["status"].to_pylist()
    errors = out["error"].to_pylist()
    by_id = dict(zip(out["image_id"].cast(pa.large_binary()).to_pylist(), zip(status, errors)))
    for name in ("good-1", "good-2", "good-3", "group-0", "group-1", "group-4", "group-5"):
        assert by_id[name.encode()] == ("ok", None), name
    for name, (_, reason) in bad.items():
        assert by_id[name.encode()][0] == "failed" and reason in by_id[name.encode()][1], name
    assert by_id[None] == ("failed", "the image id is null")
    assert by_id[b"\xff\xfe-latin"][0] == "failed" and "not valid UTF-8" in by_id[b"\xff\xfe-latin"][1]
    assert "holds text" in by_id[b"text-bytes"][1] and "neither bytes nor a path" in by_id[b"neither"][1]
    for name in ("group-2", "group-3"):  # the corrupt group: failed rows that keep their ids
        assert by_id[name.encode()][0] == "failed" and "row group 1 of the input could not be read" in by_id[name.encode()][1]
    assert by_id[b"tiny"] == ("skipped", None)
    assert len(out) == len(ids) + 3 + 2 + 6  # every input row once
    assert (report.images_ok, report.images_failed) == (status.count("ok"), status.count("failed")) == (7, len(bad) + 6)
    assert report.images_skipped == status.count("skipped") == 1


def test_skip_below_leaves_clean_and_tiny_images_untouched(ray_local, trained_model, tmp_path):
    """With skip_below, an image whose estimated noise is below it, and any image too small
    for the model (under 8 pixels a side, whatever skip_below), is `skipped`: its input
    bytes carried unchanged, no error. Every decoded row records its noise estimate; the
    report counts the skipped rows and the estimates."""
    clean = (shared_data("Set12") / "01.png").read_bytes()
    pixels, _ = to_float(decode(clean).pixels, "L")
    noisy = encode_png(from_float(protocol_noisy(pixels, 25, seed=0), "L"), "L")
    tiny = encode_png(np.full((5, 5), 128, np.uint8), "L")
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image_id": ["clean", "noisy", "tiny"], "image": pa.array([clean, noisy, tiny], pa.binary())}),
                   tmp_path / "in" / "a.parquet")
    skipping = replace(job(str(tmp_path / "in"), str(tmp_path / "out"), trained_model),
                       settings=RestoreSettings(batch_size=4, skip_below=3.0))
    report = restore_dataset(skipping)
    out = rows(str(tmp_path / "out")).to_pydict()
    assert out["status"] == ["skipped", "ok", "skipped"] and out["error"] == [None, None, None]
    assert out["image"][0] == clean and out["image"][2] == tiny and out["image"][1] != noisy
    sigma_clean, sigma_noisy, sigma_tiny = out["noise_sigma"]
    assert sigma_clean < 3 <= 20 < sigma_noisy < 30 and sigma_tiny is None
    assert (report.images_ok, report.images_skipped, report.images_failed) == (1, 2, 0)
    assert sum(report.noise_sigma_counts) == 2 and report.noise_sigma_counts[int(sigma_noisy)] == 1
    assert "1 ok, 2 skipped, 0 failed" in format_report(report.to_dict())

    report = restore_dataset(replace(skipping, output=str(tmp_path / "all"), settings=RestoreSettings(batch_size=4)))
    assert rows(str(tmp_path / "all"))["status"].to_pylist() == ["ok", "ok", "skipped"]  # no skip_below: only the tiny one
    assert (report.images_ok, report.images_skipped) == (2, 1)

    # The threshold decides the output's rows: a rerun with another one redoes the file, the same one does not.
    assert restore_dataset(skipping).files_restored == 0
    rerun = restore_dataset(replace(skipping, settings=RestoreSettings(batch_size=4, skip_below=0.0)))
    assert rerun.files_restored == 1 and rows(str(tmp_path / "out"))["status"].to_pylist() == ["ok", "ok", "skipped"]


def test_mixed_gray_and_colour_dataset_in_one_job_each_model_its_path(ray_local, trained_model, tmp_path):
    """Gray and colour rows in one dataset: a gray model restores the colour row one channel
    at a time and the summary says so once; a colour model restores every row, the gray one
    staying gray, with no such note."""
    rng = np.random.default_rng(5)
    gray = encode_png(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L")
    colour = [encode_png(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB") for _ in range(2)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image_id": ["gray", "rgb1", "rgb2"], "image": pa.array([gray, *colour], pa.binary())}),
                   tmp_path / "in" / "a.parquet")
    report = restore_dataset(job(str(tmp_path / "in"), str(tmp_path / "gray-model"), trained_model))
    assert (report.images_ok, report.images_per_channel) == (3, 2)
    text = format_report(report.to_dict())
    assert text.count("2 colour image(s) were restored one channel at a time") == 1
    modes = [decode(png).mode for png in rows(str(tmp_path / "gray-model"))["image"].to_pylist()]
    assert modes == ["L", "RGB", "RGB"]

    torch.manual_seed(0)
    colour_model = build_model("resnet", channels=3, blocks=1, width=8)
    save_model(str(tmp_path / "colour-model"), colour_model)
    report = restore_dataset(job(str(tmp_path / "in"), str(tmp_path / "colour-out"), str(tmp_path / "colour-model")))
    assert (report.images_ok, report.images_failed, report.images_per_channel) == (3, 0, 0)
    assert "channel at a time" not in format_report(report.to_dict())
    modes = [decode(png).mode for png in rows(str(tmp_path / "colour-out"))["image"].to_pylist()]
    assert modes == ["L", "RGB", "RGB"]


def test_nested_partitioned_and_same_named_files_each_restore_once(ray_local, noisy_set12, trained_model, s3_prefix):
    """Real layouts: folders several levels deep, Hive partitions, Hugging Face shard names
    and the same file name in two folders. Outputs mirror every relative path; the manifest
    is keyed by it, so a rerun restores nothing, and an output that is missing or was
    changed (as a crashed run by another model would leave it) is restored again, alone."""
    sources = storage.list_files(noisy_set12)
    layout = ["a/b/c/part-0.parquet", "date=2026-12-01/part-0.parquet", "data/train-00000-of-00002.parquet",
              "x/same.parquet", "y/same.parquet", "top.parquet"]
    source = s3_prefix + "/in"
    for index, relative in enumerate(layout):
        storage.write_bytes(storage.join(source, relative), storage.read_bytes(sources[index % len(sources)].uri))
    output = s3_prefix + "/out"
    first = restore_dataset(job(source, output, trained_model))
    assert first.files_restored == len(layout)
    written = sorted(storage.relative_path(output, info.uri) for info in storage.list_files(output))
    assert written == sorted(layout)
    for relative in layout:  # each output holds its own input's rows
        assert read_table(storage.join(output, relative))["image_id"].to_pylist() == \
            read_table(storage.join(source, relative))["image_id"].to_pylist()
    assert restore_dataset(job(source, output, trained_model)).files_restored == 0
    storage.delete(storage.join(output, "y/same.parquet"))
    storage.write_bytes(storage.join(output, "a/b/c/part-0.parquet"), b"PAR1 overwritten by another run")
    again = restore_dataset(job(source, output, trained_model))
    assert (again.files_restored, again.files_skipped) == (2, len(layout) - 2)
    assert sorted(storage.relative_path(output, uri) for uri in again.outputs) == ["a/b/c/part-0.parquet",
                                                                                  "y/same.parquet"]
    assert restore_dataset(job(source, output, trained_model)).files_restored == 0


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_output_that_overlaps_the_input_is_refused_and_the_input_untouched(where, trained_model, noisy_set12,
                                                                             tmp_path, s3_prefix):
    from pipeline import cli

    source = str(tmp_path / "in") if where == "local" else s3_prefix + "/in"
    for info in storage.list_files(noisy_set12):
        storage.write_bytes(storage.join(source, storage.relative_path(noisy_set12, info.uri)), storage.read_bytes(info.uri))
    before = {info.uri: storage.read_bytes(info.uri) for info in storage.list_files(source)}
    outputs = [source, source + "/", source + "/restored", source.rsplit("/", 1)[0]]
    if where == "local":
        outputs.append("file://" + source + "/./restored/..")
    for output in outputs:
        with pytest.raises(storage.OverlapError):
            restore_dataset(job(source, output, trained_model))
        assert cli.main(["restore", "--input", source, "--output", output, "--model", trained_model]) == 2
    after = {info.uri: storage.read_bytes(info.uri) for info in storage.list_files(source, suffixes=())}
    assert after == before  # byte-identical, and no other file added
    assert not storage.exists(storage.join(source, "_resflow"))  # no lease, no manifest either


def test_image_paths_outside_the_dataset_are_never_read(ray_local, trained_model, s3_prefix, tmp_path, capfd):
    """Hugging Face values without bytes: `../x`, an absolute path and another bucket fail
    as rows, and nothing of the files they name reaches the output or the logs."""
    secret = b"TOP-SECRET-" + uuid.uuid4().hex.encode()
    marker_image = encode_png(np.frombuffer((secret * 40)[:32 * 32], np.uint8).reshape(32, 32), "L")
    storage.write_bytes(s3_prefix + "/secret.png", marker_image)  # beside the dataset, not in it
    storage.ensure_bucket("s3://other-bucket")
    storage.write_bytes("s3://other-bucket/secret.png", marker_image)
    (tmp_path / "secret.png").write_bytes(marker_image)
    good = (shared_data("Set12") / "02.png").read_bytes()
    storage.write_bytes(s3_prefix + "/data/images/good.png", good)
    paths = {"relative-inside": "images/good.png", "dot-dot": "../secret.png", "absolute": str(tmp_path / "secret.png"),
             "other-bucket": "s3://other-bucket/secret.png", "same-bucket-outside": s3_prefix + "/secret.png"}
    values = pa.array([{"bytes": None, "path": path} for path in paths.values()],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"image_id": list(paths), "image": values}), sink)
    storage.write_bytes(s3_prefix + "/data/part-0.parquet", sink.getvalue().to_pybytes())
    report = restore_dataset(job(s3_prefix + "/data", s3_prefix + "/out", trained_model))
    out = rows(s3_prefix + "/out")
    result = dict(zip(out["image_id"].to_pylist(), zip(out["status"].to_pylist(), out["error"].to_pylist())))
    assert result["relative-inside"] == ("ok", None)
    for name in ("dot-dot", "absolute", "other-bucket", "same-bucket-outside"):
        assert result[name][0] == "failed" and result[name][1].startswith("path outside the dataset"), name
    assert report.images_failed == 4
    stored = b"".join(storage.read_bytes(info.uri) for info in storage.list_files(s3_prefix + "/out", suffixes=()))
    logs = "".join(capfd.readouterr())
    assert secret not in stored and secret.decode() not in logs
    assert marker_image not in stored


def test_tiled_restore_of_a_large_image_matches_whole(ray_local, trained_model, tmp_path):
    rng = np.random.default_rng(3)
    tiles = [np.asarray(decode((shared_data("BSD68") / f"test00{i}.png").read_bytes()).pixels) for i in (1, 2)]
    large = np.concatenate([tiles[0][:300, :460], tiles[1][:300, :460]], axis=0)  # 600 x 460
    noisy = np.clip(large + rng.normal(0, 25, large.shape), 0, 255).round().astype(np.uint8)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image_id": ["large"], "image": [encode_png(noisy, "L")]}), tmp_path / "in" / "in.parquet")
    restore_dataset(job(str(tmp_path / "in"), str(tmp_path / "whole"), trained_model, tile=1024, tile_overlap=0))
    restore_dataset(job(str(tmp_path / "in"), str(tmp_path / "tiled"), trained_model, tile=128, tile_overlap=32))
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
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "in.parquet", row_group_size=2)  # 3 row groups: 2 + 2 + 1
    restore_dataset(job(str(tmp_path / "in"), str(tmp_path / "out"), trained_model, batch_size=4))
    out_file = pq.ParquetFile(tmp_path / "out" / "in.parquet")
    out = out_file.read()
    assert out.column_names == [*table.column_names, "status", "error", "model_version", "noise_sigma"]
    for name in ("image_id", "taken", "tags", "box", "camera"):
        assert out.schema.field(name).type == table.schema.field(name).type, name
        assert out[name].to_pylist() == table[name].to_pylist(), name
    assert out_file.num_row_groups == 3 and set(out["status"].to_pylist()) == {"ok"}


def test_bad_input_stops_before_any_work(trained_model, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    pq.write_table(pa.table({"image_id": ["a"], "picture": [b"x"]}), source / "missing.parquet")
    with pytest.raises(SchemaError, match="no image column 'image'"):
        restore_dataset(job(str(source), str(tmp_path / "out"), trained_model))
    (source / "missing.parquet").unlink()
    pq.write_table(pa.table({"image_id": ["a"], "image": [3]}), source / "typed.parquet")
    with pytest.raises(SchemaError, match="'image' has type int64"):
        restore_dataset(job(str(source), str(tmp_path / "out"), trained_model))
    with pytest.raises(DatasetError, match="no Parquet files"):
        restore_dataset(job(str(tmp_path / "nothing"), str(tmp_path / "out"), trained_model))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("model.json",):
        (pickled / name).write_bytes((__import__("pathlib").Path(trained_model) / name).read_bytes())
    torch.save({"w": torch.zeros(1)}, pickled / "model.safetensors")
    (source / "typed.parquet").unlink()
    pq.write_table(pa.table({"image_id": ["a"], "image": [b"x"]}), source / "ok.parquet")
    with pytest.raises(ModelLoadError, match="refusing to load"):
        restore_dataset(job(str(source), str(tmp_path / "out"), str(pickled)))
    (source / "truncated.parquet").write_bytes((source / "ok.parquet").read_bytes()[:-20])  # no footer
    with pytest.raises(DatasetError, match="truncated.parquet is not a readable Parquet file"):
        restore_dataset(job(str(source), str(tmp_path / "out"), trained_model))
    assert storage.list_files(str(tmp_path / "out")) == []  # no output written, whatever stopped the job


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
    from pipeline.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE
    from pipeline.restore.driver import replica_settings

    def replicas(**job_fields) -> RestoreSettings:
        return replica_settings(RestoreJob("a", "b", "m", **job_fields), {"CPU": 8, "GPU": 1})[1]

    cpu, gpu = replicas(), replicas(use_gpu=True, settings=RestoreSettings(io_threads=2))
    gpu_fields = {"use_gpu": True, "settings": RestoreSettings(io_threads=2)}
    units_at_once = [replica_settings(RestoreJob("a", "b", "m", **fields), {"CPU": 8, "GPU": 1})[3]
                     for fields in ({}, gpu_fields, {"units_per_worker": 1}, {**gpu_fields, "units_per_worker": 8})]
    assert units_at_once == [CPU_UNITS_AT_ONCE, GPU_UNITS_AT_ONCE, 1, 8]
    with pytest.raises(ValueError, match="units_per_worker"):
        RestoreJob("a", "b", "m", units_per_worker=0)
    assert (cpu.rows_per_forward, gpu.rows_per_forward) == (CPU_BATCH_SIZE, GPU_BATCH_SIZE)
    assert CPU_BATCH_SIZE < GPU_BATCH_SIZE
    assert cpu.rows_per_call >= cpu.rows_per_forward and gpu.rows_per_call >= gpu.rows_per_forward
    assert replicas(use_gpu=True, settings=RestoreSettings(batch_size=2, io_threads=2)).rows_per_forward == 2
    assert replicas(settings=RestoreSettings(batch_size=32)).rows_per_call == 32  # a call holds a whole pass
    args = build_parser().parse_args(["restore", "--input", "a", "--output", "b", "--model", "m"])
    assert args.batch_size is None  # the CLI leaves the choice to the settings, which know the device
    with pytest.raises(ValueError, match="batch_size"):
        RestoreSettings(batch_size=0)


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
    from pipeline.restore import driver

    monkeypatch.setattr(driver, "PROGRESS_POLL_S", 0.05)
    clock = time.monotonic()
    rising = lambda: int((time.monotonic() - clock) * 100)  # noqa: E731  rows keep coming
    results = driver.batches_with_watchdog(_SlowResults(1.5), 0.5, lambda: "somewhere", rising)
    assert list(results) == ["file done"]  # 3x the stall timeout before the file finished: no stall
    stuck = driver.batches_with_watchdog(_SlowResults(30), 0.5, lambda: "at row 7", lambda: 7)
    started = time.monotonic()
    with pytest.raises(StallError, match="no restored rows for 0 s: at row 7"):
        list(stuck)
    assert time.monotonic() - started < 10


def restore_in_background(restore_job: RestoreJob) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            outcome["report"] = restore_dataset(restore_job)
        except Exception as error:  # a clean failure is allowed; the rerun must finish the job
            outcome["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    return worker, outcome


def wait_until_some_files_are_done(manifest: Manifest, worker: threading.Thread, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and worker.is_alive():
        done = len(manifest.all())
        if done:
            return done
        time.sleep(0.3)
    raise AssertionError("no file was restored before the fault was due")


def assert_every_row_exactly_once(source: str, output: str) -> None:
    expected = {storage.relative_path(source, info.uri): read_table(info.uri, columns=["image_id"])["image_id"].to_pylist()
                for info in storage.list_files(source)}
    written = {storage.relative_path(output, info.uri): read_table(info.uri, columns=["image_id", "status"])
               for info in storage.list_files(output)}
    assert set(written) == set(expected)  # one output per input, nothing half-written beside them
    for key, ids in expected.items():
        assert written[key]["image_id"].to_pylist() == ids  # every row once, in order
        assert set(written[key]["status"].to_pylist()) == {"ok"}


@pytest.fixture(scope="module")
def bsd68_input(s3_server):
    """68 BSD68 images in 17 files of 4: enough files that a fault lands mid-run."""
    root = f"s3://tests/bsd68-{time.time_ns()}"
    ingest(str(shared_data("BSD68")), root + "/in", rows_per_file=4, progress=False)
    return root + "/in"


def test_s3_restart_mid_run_loses_and_duplicates_nothing(ray_local, s3_server, trained_model, bsd68_input, s3_prefix):
    files = storage.list_files(bsd68_input)
    manifest = Manifest(s3_prefix + "/out", "manifest")
    worker, outcome = restore_in_background(job(bsd68_input, s3_prefix + "/out", trained_model))
    done_at_fault = wait_until_some_files_are_done(manifest, worker)
    s3server.restart(s3_server.data_dir, down_seconds=3, hard=True)  # a crash and ~10 s outage mid-run
    assert 0 < done_at_fault < len(files) and worker.is_alive()  # the fault struck mid-run
    worker.join(timeout=600)
    assert not worker.is_alive()
    if "error" in outcome:
        restore_dataset(job(bsd68_input, s3_prefix + "/out", trained_model))
    assert_every_row_exactly_once(bsd68_input, s3_prefix + "/out")


def test_s3_server_paused_past_the_request_timeout(ray_local, s3_server, trained_model, bsd68_input, s3_prefix):
    """SIGSTOP: connections are accepted but nothing answers, for longer than one request
    may take (RESFLOW_S3_REQUEST_TIMEOUT_S); then SIGCONT."""
    import os
    import signal

    timeout = float(os.environ["RESFLOW_S3_REQUEST_TIMEOUT_S"])
    files = storage.list_files(bsd68_input)
    manifest = Manifest(s3_prefix + "/out", "manifest")
    worker, outcome = restore_in_background(job(bsd68_input, s3_prefix + "/out", trained_model))
    done_at_fault = wait_until_some_files_are_done(manifest, worker)
    server = s3server.read_state(s3_server.data_dir)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        time.sleep(timeout * 1.5)
        assert worker.is_alive()
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert 0 < done_at_fault < len(files)  # the fault struck mid-run
    worker.join(timeout=600)
    assert not worker.is_alive()
    if "error" in outcome:
        restore_dataset(job(bsd68_input, s3_prefix + "/out", trained_model))
    assert_every_row_exactly_once(bsd68_input, s3_prefix + "/out")


def test_two_restore_processes_on_one_output_never_write_together(s3_server, trained_model, bsd68_input, s3_prefix):
    """Two `resflow restore` commands on the same output: one holds the lease and restores;
    the other stops at once, naming the holder. Every row is written exactly once."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "pipeline.cli", "restore", "--input", bsd68_input, "--output", s3_prefix + "/out",
               "--model", trained_model, "--workers", "1", "--json"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    results = [(run.pid, *run.communicate(timeout=600), run.returncode) for run in runs]
    winners = [result for result in results if result[3] == 0]
    losers = [result for result in results if result[3] != 0]
    assert len(winners) == 1 and len(losers) == 1, [result[3] for result in results]
    loser_stderr = losers[0][2]
    assert f"pid {winners[0][0]}" in loser_stderr and "another run is writing to" in loser_stderr
    assert losers[0][3] == 75  # try again later, not a usage error
    assert json.loads(winners[0][1].strip().splitlines()[-1])["images_ok"] == 68
    assert_every_row_exactly_once(bsd68_input, s3_prefix + "/out")


def test_resflow_restore_runs_local_ray_without_its_dashboard(monkeypatch):
    """`resflow restore` is a process of its own, so its local Ray leaves the dashboard out
    (10 processes, ~210 MB); a restore inside a longer process keeps it for training."""
    import inspect
    import os
    import subprocess
    import sys

    from pipeline import cli, raycluster, restore
    from pipeline.restore import driver

    asked = {}
    monkeypatch.setattr(raycluster, "LOCAL_DASHBOARD", True)  # undone at the end, for the tests that train
    monkeypatch.setattr(driver, "restore_dataset", lambda job, events=None: asked.update(
        ray_dashboard=raycluster.LOCAL_DASHBOARD) or restore.RestoreReport(job.output, "v1"))
    assert cli.main(["restore", "--input", "a", "--output", "b", "--model", "m"]) == 0
    assert asked == {"ray_dashboard": False}
    assert raycluster.LOCAL_DASHBOARD is True  # only for the restore: later steps in this process keep it
    monkeypatch.undo()
    assert raycluster.LOCAL_DASHBOARD is True
    assert inspect.signature(raycluster.connect).parameters["dashboard"].default is None

    code = ("import ray; from pipeline import raycluster; raycluster.connect(num_cpus=1, dashboard={}); "
            "print(bool(ray._private.worker.get_dashboard_url())); ray.shutdown()")
    for dashboard in (False, True):
        started = subprocess.run([sys.executable, "-c", code.format(dashboard)], capture_output=True, text=True,
                                 timeout=180, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip().splitlines()[-1] == str(dashboard)


# --- units of work: large files over many replicas ------------------------------------------------


@pytest.fixture(scope="module")
def one_large_file(s3_server):
    """32 BSD68 images in ONE file of 16 row groups of 2, with other columns; and an
    untrained DnCNN-S, slow enough here (~0.5 s an image) that units overlap in time."""
    root = f"s3://tests/large-{time.time_ns()}"
    images = [path.read_bytes() for path in sorted(shared_data("BSD68").glob("*.png"))[:32]]
    table = pa.table({"image_id": [f"bsd-{i:02d}" for i in range(32)], "image": pa.array(images, pa.binary()),
                      "label": pa.array(range(32), pa.int32()),
                      "tags": pa.array([["a", str(i)] for i in range(32)], pa.list_(pa.string()))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=2)
    storage.write_bytes(root + "/in/shard-00000-of-00001.parquet", sink.getvalue().to_pybytes())
    save_model(root + "/dncnn-s", build_model("dncnn", depth=17, width=64), version="dncnn-s-untrained")
    return root


def test_one_large_file_is_spread_over_both_replicas_and_assembled_whole(ray_local, one_large_file, s3_prefix):
    source, output = one_large_file + "/in", s3_prefix + "/out"
    report = restore_dataset(job(source, output, one_large_file + "/dncnn-s", batch_size=2, unit_rows=4,
                                 units_per_worker=2))
    assert (report.files_restored, report.units_restored) == (1, 8)  # 16 groups of 2 rows, 4 rows a unit
    assert len(report.rows_by_replica) == 2 and all(rows > 0 for rows in report.rows_by_replica.values())
    assert sum(report.rows_by_replica.values()) == 32
    assert report.most_units_at_once == 2  # units_per_worker: two units under way in one replica
    [written] = storage.list_files(output)
    restored, original = read_table(written.uri), read_table(source + "/shard-00000-of-00001.parquet")
    assert restored["image_id"].to_pylist() == original["image_id"].to_pylist()  # every row once, in order
    for name in ("label", "tags"):
        assert restored.schema.field(name).type == original.schema.field(name).type
        assert restored[name].to_pylist() == original[name].to_pylist()
    assert pq.ParquetFile(storage.pyarrow_filesystem(written.uri)[0].open_input_file(
        storage.parse(written.uri).path)).num_row_groups == 16  # row groups kept
    assert storage.list_files(output + "/_resflow/parts") == []  # the parts went once assembled
    assert set(report.stage_seconds) == {"read", "decode", "noise", "forward", "encode", "write"}
    assert report.stage_seconds["forward"] > report.stage_seconds["read"]
    assert sum(report.noise_sigma_counts[:3]) == 32  # clean BSD68 reads below 3, summed over all 8 units


def test_a_replica_killed_mid_file_redoes_only_its_unit(ray_local, one_large_file, s3_prefix):
    import os
    import signal

    from ray.util.state import list_actors

    source, output = one_large_file + "/in", s3_prefix + "/out"
    units = Manifest(output, "units")
    restore_job = job(source, output, one_large_file + "/dncnn-s", batch_size=2, unit_rows=4)
    worker, outcome = restore_in_background(restore_job)
    deadline = time.time() + 300
    while time.time() < deadline and worker.is_alive() and not units.all():
        time.sleep(0.3)
    done_at_fault = len(units.all())
    replicas = [actor for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                if "UnitRestorer" in actor.class_name]
    assert replicas and worker.is_alive()
    os.kill(replicas[0].pid, signal.SIGKILL)
    assert 0 < done_at_fault < 8  # the fault struck mid-file: some units done, not all
    worker.join(timeout=900)
    assert not worker.is_alive()
    if "error" in outcome:  # Ray did not recover: the rerun restores only what no unit record vouches for
        rerun = restore_dataset(restore_job)
        assert rerun.units_skipped >= done_at_fault and rerun.units_skipped + rerun.units_restored == 8
    else:
        report = outcome["report"]
        # at most the killed replica's units under way, again
        assert report.units_restored == 8 and len(report.units_retried) <= CPU_UNITS_AT_ONCE
    assert_every_row_exactly_once(source, output)


def processes_marked(mark: str) -> list:
    """Live processes whose environment holds RESFLOW_TEST_RUN=mark (zombies count as gone)."""
    import psutil

    marked = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("RESFLOW_TEST_RUN") == mark:
                marked.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return marked


def test_a_crashed_run_is_finished_by_redoing_only_its_unfinished_units(s3_server, one_large_file, s3_prefix):
    """The restore's driver killed with SIGKILL mid-file takes its local Ray and replicas
    with it; the rerun takes the expired lease over and restores only the units no record
    vouches for."""
    import os
    import signal
    import subprocess
    import sys

    source, output = one_large_file + "/in", s3_prefix + "/out"
    command = [sys.executable, "-m", "pipeline.cli", "restore", "--input", source, "--output", output, "--model",
               one_large_file + "/dncnn-s", "--executor", "ray", "--workers", "1", "--batch-size", "2",
               "--unit-rows", "4", "--lease-ttl", "5", "--json"]
    # Every process of this run (its driver, its local Ray, the replicas) inherits the mark;
    # a worker renames its cmdline, not its environment, and others' Ray lacks the mark.
    mark = uuid.uuid4().hex
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {"RESFLOW_TEST_RUN": mark}
    # Ray's workers poll once a second for their raylet's death, and a replica that missed it
    # outlived `make test` by hours; a poll that never comes stands for that miss here.
    env["RAY_raylet_death_check_interval_milliseconds"] = str(10**9)
    # Only the driver is killed, as by the OOM killer or `kill -9 PID`: not its process group.
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    units = Manifest(output, "units")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and run.poll() is None and len(units.all()) < 2:
            time.sleep(0.3)
        done_at_crash = len(units.all())
        replicas_at_crash = [proc for proc in processes_marked(mark) if "UnitRestorer" in " ".join(proc.cmdline())]
        os.kill(run.pid, signal.SIGKILL)
    finally:
        run.wait()
    assert 2 <= done_at_crash < 8 and not storage.exists(output + "/shard-00000-of-00001.parquet")
    assert replicas_at_crash  # the run was on Ray's replicas when it was killed
    deadline = time.time() + 30
    while time.time() < deadline and processes_marked(mark):
        time.sleep(0.5)
    left = processes_marked(mark)
    left_running = [" ".join(proc.cmdline())[:80] for proc in left]
    for proc in left:  # a failure here must not leave them to the other tests
        proc.kill()
    assert left_running == []  # nothing of the killed run left running
    rerun = restore_dataset(job(source, output, one_large_file + "/dncnn-s", batch_size=2, unit_rows=4,
                                lease_wait_s=60, lease_ttl_s=5))
    assert rerun.units_skipped >= done_at_crash and rerun.units_skipped + rerun.units_restored == 8
    assert rerun.units_restored <= 8 - done_at_crash
    assert_every_row_exactly_once(source, output)


def test_a_model_call_holds_one_shape_bounded_by_rows_and_by_pixels():
    from pipeline.config import ROWS_PER_CALL
    from pipeline.restore.replica import in_row_order, model_calls
    from tests.test_images import png_header_only

    wide, tall = encode_png(np.zeros((40, 50), np.uint8), "L"), encode_png(np.zeros((50, 40), np.uint8), "L")
    huge = png_header_only(8000, 8000)  # 64 MP
    images = pa.chunked_array([pa.array([wide, tall, huge, huge, wide, tall, wide], pa.binary())])
    calls = model_calls(images, RestoreSettings(batch_size=16, max_call_megapixels=32))
    assert calls == [[0, 4, 6], [1, 5], [2], [3]]  # one shape per call; each 64 MP image a call of its own
    many = pa.chunked_array([pa.array([wide] * (ROWS_PER_CALL + 2), pa.binary())])
    assert model_calls(many, RestoreSettings(max_call_megapixels=1000)) == [list(range(ROWS_PER_CALL)),
                                                                            [ROWS_PER_CALL, ROWS_PER_CALL + 1]]
    rows = pa.table({"image_id": [str(row) for row in range(7)]})
    parts = [rows.take(call) for call in calls]
    assert in_row_order(parts, calls)["image_id"].to_pylist() == [str(row) for row in range(7)]


# --- the executor: a small plan in this process ------------------------------------------------


def test_the_executor_is_the_jobs_choice_else_in_process_only_for_a_small_local_cpu_plan(monkeypatch):
    from pipeline.restore.executors import IN_PROCESS_MAX_ROWS, choose_executor

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    plain = RestoreJob("a", "b", "m")
    assert choose_executor(plain, IN_PROCESS_MAX_ROWS) == "in-process"
    assert choose_executor(plain, IN_PROCESS_MAX_ROWS + 1) == "ray"
    assert choose_executor(replace(plain, workers=2), 4) == "ray"  # replicas asked for: Ray runs them
    assert choose_executor(replace(plain, use_gpu=True), 4) == "ray"
    assert choose_executor(replace(plain, executor="in-process"), 10**6) == "in-process"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert choose_executor(plain, 4) == "ray"
    with pytest.raises(ValueError, match="executor"):
        RestoreJob("a", "b", "m", executor="threads")


def test_a_small_plan_restores_in_this_process_as_ray_would(ray_local, one_large_file, s3_prefix):
    """No Ray for a small plan: the same units, assembly, manifest and pixels as Ray's
    replicas write (within one level: bf16 sums over other thread counts), in this process."""
    import os
    import socket

    source, model = one_large_file + "/in", s3_prefix + "/tiny"
    torch.manual_seed(0)
    save_model(model, build_model("dncnn", depth=3, width=4), version="tiny")
    here = restore_dataset(RestoreJob(source, s3_prefix + "/here", model, unit_rows=8, stall_timeout_s=300))
    assert here.executor == "in-process"
    assert here.rows_by_replica == {f"{socket.gethostname()}:{os.getpid()}": 32}  # this process did it all
    assert (here.files_restored, here.units_restored, here.images_ok) == (1, 8, 32)  # 8 units, assembled here
    assert storage.list_files(s3_prefix + "/here/_resflow/parts") == []
    assert here.first_rows_seconds > 0
    on_ray = restore_dataset(job(source, s3_prefix + "/ray", model, batch_size=None, unit_rows=8, executor="ray"))
    assert on_ray.executor == "ray" and os.getpid() not in {int(r.split(":")[1]) for r in on_ray.rows_by_replica}
    [written_here], [written_ray] = storage.list_files(s3_prefix + "/here"), storage.list_files(s3_prefix + "/ray")
    ours, theirs = read_table(written_here.uri), read_table(written_ray.uri)
    assert ours["image_id"].to_pylist() == theirs["image_id"].to_pylist() == [f"bsd-{i:02d}" for i in range(32)]
    for name in ("label", "tags", "status"):
        assert ours[name].to_pylist() == theirs[name].to_pylist()
    for a, b in zip(ours["image"].to_pylist(), theirs["image"].to_pylist()):
        assert np.abs(decode(a).pixels.astype(int) - decode(b).pixels.astype(int)).max() <= 1
    again = restore_dataset(RestoreJob(source, s3_prefix + "/here", model, unit_rows=8))
    assert (again.files_skipped, again.files_restored) == (1, 0)  # recorded in the manifest like Ray's runs


# --- the head start: this process restores units while local Ray starts --------------------------


def test_the_head_start_is_for_a_cpu_run_that_starts_local_ray_and_not_after_a_crash(monkeypatch):
    import ray

    from pipeline.restore.executors import head_start_wanted

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    plain = RestoreJob("a", "b", "m")
    assert head_start_wanted(plain, 2, after_crash=False)
    assert not head_start_wanted(plain, 1, after_crash=False)  # one unit: the in-process executor's case
    assert not head_start_wanted(plain, 2, after_crash=True)  # an image that crashed the driver meets a replica
    assert not head_start_wanted(replace(plain, use_gpu=True), 2, after_crash=False)
    assert not head_start_wanted(replace(plain, executor="ray"), 2, after_crash=False)  # replicas asked for
    assert not head_start_wanted(replace(plain, workers=2), 2, after_crash=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # Ray already up: nothing to wait for
    assert not head_start_wanted(plain, 2, after_crash=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert not head_start_wanted(plain, 2, after_crash=False)


def test_a_unit_goes_to_the_driver_or_to_a_replica_never_both():
    from pipeline.restore.replica import Progress

    progress = Progress(driver_units=("f/000000-000001",))
    assert progress.start("f/000000-000001") == 0  # claimed by the driver's head start: passed by
    assert progress.claim_for_driver("f/000002-000003")
    assert progress.start("f/000002-000003") == 0
    assert progress.start("f/000004-000005") == 1  # a replica's first unit
    assert not progress.claim_for_driver("f/000006-000007")  # replicas are up: the head start is over
    assert progress.start("f/000006-000007") == 1 and progress.attempts_of() == {
        "f/000004-000005": 1, "f/000006-000007": 1}


def test_a_head_start_unit_is_passed_by_the_replicas_and_restored_again_when_it_fails(
        ray_local, one_large_file, s3_prefix, monkeypatch):
    """The head start's unit waits here until a replica has started, then fails once: the
    replicas restore every other unit and pass that one by, and the driver restores it
    again at the end. Every row once, in order; the head start's rows by this process."""
    import os
    import socket

    import ray

    from pipeline.restore import driver, executors

    source, model = one_large_file + "/in", s3_prefix + "/tiny"
    torch.manual_seed(0)
    save_model(model, build_model("dncnn", depth=3, width=4), version="tiny")
    actors, calls = [], []
    attach = executors.HeadStart.attach
    monkeypatch.setattr(executors.HeadStart, "attach", lambda head, make: actors.append(attach(head, make)) or actors[0])
    restore_unit = executors.UnitRestorer.restore_unit

    def first_waits_for_a_replica_then_fails(replica, unit):  # only this process's: replicas import their own
        calls.append(unit.name)
        if len(calls) == 1:
            deadline = time.monotonic() + 120
            while not (actors and ray.get(actors[0].attempts_of.remote())):
                assert time.monotonic() < deadline, "no replica started a unit"
                time.sleep(0.2)
            raise OSError("the head start's unit failed")
        return restore_unit(replica, unit)

    monkeypatch.setattr(executors.UnitRestorer, "restore_unit", first_waits_for_a_replica_then_fails)
    monkeypatch.setattr(driver, "head_start_wanted", lambda job, units, after_crash: True)
    output = s3_prefix + "/out"
    report = restore_dataset(job(source, output, model, batch_size=None, unit_rows=4, executor="ray"))
    here = f"{socket.gethostname()}:{os.getpid()}"
    assert calls == ["shard-00000-of-00001.parquet/000014-000015"] * 2  # the last unit, failed, then again
    assert report.units_head_start == 1 and report.rows_by_replica[here] == 4
    assert sum(report.rows_by_replica.values()) == 32 and len(report.rows_by_replica) >= 2
    assert (report.files_restored, report.units_restored, report.images_ok) == (1, 8, 32)
    [written] = storage.list_files(output)
    assert read_table(written.uri)["image_id"].to_pylist() == [f"bsd-{i:02d}" for i in range(32)]
    assert "1 unit(s) restored in this process while Ray started" in format_report(report.to_dict())
    again = restore_dataset(job(source, output, model, batch_size=None, unit_rows=4, executor="ray"))
    assert (again.files_skipped, again.files_restored) == (1, 0)
