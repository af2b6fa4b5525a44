"""Build image datasets: `ingest` (image files -> Parquet) and `split` (train / held out).

    resflow ingest ./photos s3://resflow/photos/
    resflow split s3://resflow/photos s3://resflow/train s3://resflow/val --val-fraction 0.05

Ingest writes deterministic file names and records each finished file in the dataset's
manifest, so a rerun skips what is done and never duplicates rows. (Degrading a clean
dataset into a paired one is `resflow degrade`: pipeline/degrade.py.)
"""

from __future__ import annotations

import glob as globlib
import hashlib
import posixpath
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline import storage
from pipeline.dataset import inspect, read_table, write_table
from pipeline.images import (
    IMAGE_SUFFIXES,
    ImageColumns,
)
from pipeline.manifest import Manifest

INGEST_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary())])


@dataclass
class IngestReport:
    images: int = 0
    files_written: int = 0
    files_skipped: int = 0
    output: str = ""


def find_images(source: str) -> tuple[list[storage.FileInfo], str]:
    """Image files under a folder/prefix, or matching a glob; returns them and the root
    that ids are relative to."""
    location = storage.parse(source)
    if globlib.has_magic(location.path):
        fs, _ = storage.fsspec_filesystem(source)
        root_path = location.path.split("*")[0].split("?")[0].split("[")[0]
        root_path = root_path if root_path.endswith("/") else posixpath.dirname(root_path)
        matches = sorted(storage.retry(lambda: fs.glob(location.path), what=f"globbing {source}"))
        infos = [storage.file_info(f"s3://{m}" if location.scheme == "s3" else m) for m in matches
                 if m.lower().endswith(IMAGE_SUFFIXES)]
        root = f"s3://{root_path}" if location.scheme == "s3" else root_path
        return infos, root
    return storage.list_files(source, suffixes=IMAGE_SUFFIXES), source


def relative_id(file_uri: str, root: str) -> str:
    return posixpath.relpath(storage.parse(file_uri).path, storage.parse(root).path)


def ingest(source: str, destination: str, rows_per_file: int = 64, progress: bool = True) -> IngestReport:
    """Store the image files under `source` as Parquet shards under `destination`,
    bytes unchanged, `image_id` = path relative to `source`."""
    if rows_per_file < 1:
        raise ValueError("rows_per_file must be >= 1")
    images, root = find_images(source)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {source}")
    if globlib.has_magic(storage.parse(source).path):  # a glob reads only its matches
        for info in images:
            storage.check_disjoint(info.uri, destination)
    else:
        storage.check_disjoint(root, destination)
    storage.ensure_bucket(destination)
    manifest = Manifest(destination, "ingest")
    finished = manifest.all()  # one read of the records, not one per shard
    report = IngestReport(images=len(images), output=destination)
    shards = list(storage.iter_chunks(images, rows_per_file))
    bar = tqdm(total=len(images), desc="ingest", unit="img", disable=not progress, file=sys.stderr)
    for index, shard in enumerate(shards):
        name = f"part-{index:05d}.parquet"
        sources = [[relative_id(info.uri, root), info.size, info.etag] for info in shard]
        done = finished.get(name)
        if done and done.get("sources") == sources and storage.exists(storage.join(destination, name)):
            report.files_skipped += 1
            bar.update(len(shard))
            continue
        ids, blobs = [], []
        for info in shard:
            ids.append(relative_id(info.uri, root))
            blobs.append(storage.read_bytes(info.uri))
            bar.update(1)
        write_table(storage.join(destination, name), pa.table([ids, blobs], schema=INGEST_SCHEMA))
        manifest.put(name, {"sources": sources, "rows": len(ids)})
        report.files_written += 1
    # A shrunken source leaves shards past the new end: remove them so no stale row stays.
    for name in manifest.all():
        if name.startswith("part-") and int(name[5:10]) >= len(shards):
            storage.delete(storage.join(destination, name))
            manifest.remove(name)
    bar.close()
    return report


def held_out(image_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def split_dataset(source: str, train_destination: str, val_destination: str, val_fraction: float = 0.05,
                  seed: int = 0, columns: ImageColumns = ImageColumns()) -> tuple[int, int]:
    """Split a dataset by a hash of `image_id`: stable when images are added, so an image
    never moves between training and validation. Returns (train rows, val rows)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be within (0, 1), got {val_fraction}")
    counts = [0, 0]
    for destination in (train_destination, val_destination):
        storage.check_disjoint(source, destination)
    for info in inspect(source, columns).files:
        table = read_table(info.uri)
        mask = np.array([held_out(image_id, val_fraction, seed) for image_id in table[columns.id].to_pylist()], bool)
        for index, (destination, part) in enumerate([(train_destination, table.filter(pa.array(~mask))),
                                                     (val_destination, table.filter(pa.array(mask)))]):
            storage.ensure_bucket(destination)
            write_table(storage.join(destination, storage.relative_path(source, info.uri)), part)
            counts[index] += part.num_rows
    return counts[0], counts[1]
