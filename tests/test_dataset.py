"""One look at a dataset (pipeline/dataset.py, `inspect`): its files, footers and kind, for
train, evaluate, ingest and degrade alike. Local files, no Ray."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset import CLEAN, NOISY, PAIRED, inspect
from pipeline.images import ImageColumns, SchemaError


def write(folder, name, **columns):
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.table({"image_id": ["a", "b"], **{key: pa.array([b"x", b"y"], pa.binary()) for key in columns}}),
                   folder / name)


def test_the_kind_comes_from_the_columns_and_every_file_is_checked_against_it(tmp_path):
    write(tmp_path / "clean", "0.parquet", image=1)
    write(tmp_path / "paired", "0.parquet", image=1, target=1)
    write(tmp_path / "paired", "1.parquet", image=1, target=1)
    clean, paired = inspect(str(tmp_path / "clean")), inspect(str(tmp_path / "paired"))
    assert (clean.kind, paired.kind, clean.rows, paired.rows, len(paired.files)) == (CLEAN, PAIRED, 2, 4, 2)
    assert inspect(str(tmp_path / "clean"), kind_without_target=NOISY).kind == NOISY  # noisy-only data
    assert inspect(str(tmp_path / "paired"), kind_without_target=NOISY, use_target=False).kind == NOISY
    assert inspect(str(tmp_path / "paired"), ImageColumns(target="other")).kind == CLEAN
    write(tmp_path / "paired", "2.parquet", image=1)  # a file of a paired dataset without its target
    with pytest.raises(SchemaError, match="2.parquet.*no image column 'target'"):
        inspect(str(tmp_path / "paired"))
    assert inspect(str(tmp_path / "paired"), use_target=False).kind == CLEAN
