import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import metrics, storage
from pipeline.dataset import DatasetError, read_table
from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation
from pipeline.images import SchemaError, decode
from pipeline.ingest import ingest
from pipeline.manifest import Manifest
from tests.conftest import REPO, shared_data
from tests.test_images import bad_values


def read_dataset(uri: str) -> pa.Table:
    return pa.concat_tables([read_table(f.uri) for f in storage.list_files(uri)])


def test_cli_ingest_set12_into_s3_is_pixel_exact(s3_prefix):
    """The issue's check: `resflow ingest ../shared/data/Set12 s3://...` -> 12 rows, original pixels."""
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "ingest", str(shared_data("Set12")), s3_prefix,
                             "--rows-per-file", "5"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    files = storage.list_files(s3_prefix)
    assert len(files) == 3  # 5 + 5 + 2
    fs, path = storage.pyarrow_filesystem(s3_prefix)
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows == 12
    assert sorted(table["image_id"].to_pylist()) == [f"{i:02d}.png" for i in range(1, 13)]
    for image_id, data in zip(table["image_id"].to_pylist(), table["image"].to_pylist()):
        original = np.asarray(Image.open(shared_data("Set12") / image_id))
        np.testing.assert_array_equal(decode(data).pixels, original)


def test_ingest_rerun_is_idempotent_and_follows_changes(tmp_path, s3_prefix):
    source = tmp_path / "images"
    (source / "sub").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((16, 16), i * 10, np.uint8)).save(source / ("sub" if i % 2 else "") / f"img{i}.png")
    first = ingest(str(source), s3_prefix, rows_per_file=2, progress=False)
    assert (first.files_written, first.files_skipped) == (3, 0)
    again = ingest(str(source), s3_prefix, rows_per_file=2, progress=False)
    assert (again.files_written, again.files_skipped) == (0, 3)
    ids = read_dataset(s3_prefix)["image_id"].to_pylist()
    assert sorted(ids) == sorted(["img0.png", "sub/img1.png", "img2.png", "sub/img3.png", "img4.png"])
    (source / "img4.png").unlink()  # shrink to 2 shards: the third must go, no stale rows stay
    ingest(str(source), s3_prefix, rows_per_file=2, progress=False)
    assert len(read_dataset(s3_prefix)) == 4
    assert len(storage.list_files(s3_prefix)) == 2 and "part-00002.parquet" not in Manifest(s3_prefix, "ingest").all()


def test_ingest_glob(tmp_path):
    for name in ["a.png", "b.png", "c.jpg"]:
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / name)
    ingest(str(tmp_path / "*.png"), str(tmp_path / "out"), progress=False)
    assert sorted(read_dataset(str(tmp_path / "out"))["image_id"].to_pylist()) == ["a.png", "b.png"]


def test_degrade_follows_the_noise_protocol(s3_prefix):
    """Set12 at sigma 25, clipped to uint8: DESIGN.md's reference is 20.37 dB."""
    ingest(str(shared_data("Set12")), s3_prefix + "/clean", progress=False)
    report = degrade_dataset(s3_prefix + "/clean", s3_prefix + "/noisy", Degradation(noise_sigma=25), seed=0,
                             progress=False)
    assert report.images == 12 and not report.failed
    table = read_dataset(s3_prefix + "/noisy")
    assert set(table.column_names) == {"image_id", "image", "target"}
    scores = [metrics.psnr(decode(t).pixels, decode(i).pixels)
              for i, t in zip(table["image"].to_pylist(), table["target"].to_pylist())]
    assert np.mean(scores) == pytest.approx(20.37, abs=0.01)
    again = degrade_dataset(s3_prefix + "/clean", s3_prefix + "/noisy", Degradation(noise_sigma=25), progress=False)
    assert again.files_skipped == 1 and len(read_dataset(s3_prefix + "/noisy")) == 12


def test_composed_degradations_and_blind_sigma(tmp_path):
    """Each stored image is exactly its recipe applied to its target with its own seed; the
    blind recipe draws a different sigma per image, inside its range."""
    from pipeline.degradations import degradation_seed
    from pipeline.images import from_float, to_float

    ingest(str(shared_data("Set12")), str(tmp_path / "clean"), progress=False)
    recipes = [Degradation(noise_sigma=None, blur_sigma=1.5, downscale=2, jpeg_quality=30),
               Degradation(noise_sigma=None, noise_sigma_range=(5, 55))]
    for index, recipe in enumerate(recipes):
        degrade_dataset(str(tmp_path / "clean"), str(tmp_path / f"out{index}"), recipe, seed_per_image=True,
                        progress=False)
        table = read_dataset(str(tmp_path / f"out{index}"))
        sigmas = []
        for image_id, image, target in zip(*(table[c].to_pylist() for c in ("image_id", "image", "target"))):
            clean = decode(target)
            rng = np.random.RandomState(degradation_seed(0, image_id, per_image=True))
            expected = from_float(recipe.apply(to_float(clean.pixels, clean.mode)[0], rng), clean.mode)
            np.testing.assert_array_equal(decode(image).pixels, expected)
            sigmas.append(float(np.std(decode(image).pixels.astype(float) - clean.pixels.astype(float))))
        if recipe.noise_sigma_range:
            assert all(4 < sigma < 56 for sigma in sigmas)  # clipping at 0 and 255 lowers it a little
            assert max(sigmas) - min(sigmas) > 15  # drawn per image across the range


def test_corrupt_rows_fail_with_reasons_while_the_rest_succeed(tmp_path):
    good = (shared_data("Set12") / "01.png").read_bytes()
    bad = bad_values()
    ids = ["good-1"] + list(bad) + ["good-2"]
    values = [good] + [value for value, _ in bad.values()] + [good]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image_id": ids, "image": pa.array(values, pa.binary()), "label": list(range(len(ids)))}),
                   tmp_path / "in" / "in.parquet")
    report = degrade_dataset(str(tmp_path / "in"), str(tmp_path / "out"), Degradation(noise_sigma=15), progress=False)
    assert report.images == 2
    reasons = {image_id: reason for _, image_id, reason in report.failed}
    assert set(reasons) == set(bad)
    for name, (_, expected) in bad.items():
        assert expected in reasons[name]
    out = read_dataset(str(tmp_path / "out"))
    assert out["image_id"].to_pylist() == ["good-1", "good-2"]
    assert out["label"].to_pylist() == [0, len(ids) - 1]  # other columns carried through


def test_hugging_face_datasets_parquet_is_read(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    paths = sorted(shared_data("Set12").glob("*.png"))[:3]
    embedded = datasets.Dataset.from_dict(
        {"image_id": [p.name for p in paths], "image": [{"bytes": p.read_bytes(), "path": p.name} for p in paths]}
    ).cast_column("image", datasets.Image())
    (tmp_path / "hf").mkdir()
    embedded.to_parquet(str(tmp_path / "hf" / "train.parquet"))
    (tmp_path / "hfpath" / "images").mkdir(parents=True)  # image files inside the dataset, paths relative to it
    for path in paths:
        (tmp_path / "hfpath" / "images" / path.name).write_bytes(path.read_bytes())
    by_path = datasets.Dataset.from_dict({"image_id": [p.name for p in paths],
                                          "image": [f"images/{p.name}" for p in paths]}).cast_column("image", datasets.Image())
    monkeypatch.chdir(tmp_path / "hfpath")  # `datasets` sizes the files through the relative paths
    by_path.to_parquet(str(tmp_path / "hfpath" / "train.parquet"))
    monkeypatch.undo()
    for name in ("hf", "hfpath"):
        image_type = pq.read_schema(tmp_path / name / "train.parquet").field("image").type
        assert pa.types.is_struct(image_type)
        report = degrade_dataset(str(tmp_path / name), str(tmp_path / f"{name}-out"), Degradation(), progress=False)
        assert report.images == 3 and not report.failed
        target = read_dataset(str(tmp_path / f"{name}-out"))["target"].to_pylist()[0]
        np.testing.assert_array_equal(decode(target).pixels, np.asarray(Image.open(paths[0])))


def test_wrong_schema_and_empty_input_stop_before_work(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image_id": ["a"], "picture": [b"x"]}), tmp_path / "in" / "in.parquet")
    with pytest.raises(SchemaError, match="no image column 'image'"):
        degrade_dataset(str(tmp_path / "in"), str(tmp_path / "out"), Degradation(), progress=False)
    assert not (tmp_path / "out").exists() or storage.list_files(str(tmp_path / "out")) == []
    with pytest.raises(DatasetError, match="no Parquet files"):
        degrade_dataset(str(tmp_path / "empty"), str(tmp_path / "out"), Degradation(), progress=False)
