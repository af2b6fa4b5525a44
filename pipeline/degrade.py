"""`resflow degrade`: writes a paired dataset (image degraded, target clean) with the
synthetic degradations of pipeline/degradations.py.

    resflow degrade s3://resflow/set12/ s3://resflow/set12-noisy25/ --noise-sigma 25 --seed 0
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field

import numpy as np

from pipeline.contract import DecodeLimits, ImageColumns
from pipeline.degradations import Degradation, degradation_seed

@dataclass
class DegradeReport:
    images: int = 0
    failed: list = field(default_factory=list)  # [(file, image_id, reason)]
    files_written: int = 0
    files_skipped: int = 0
    output: str = ""


def degrade_dataset(source: str, destination: str, degradation: Degradation, seed: int = 0,
                    seed_per_image: bool = False, columns: ImageColumns = ImageColumns(),
                    limits: DecodeLimits = DecodeLimits(), progress: bool = True,
                    keep_target: bool = True) -> DegradeReport:
    """Write a paired dataset: `image` degraded (lossless PNG of the clipped, rounded
    result), `target` the untouched clean bytes (left out with `keep_target=False`: a
    noisy-only dataset, what self-supervised training learns from), other columns carried
    through, each file at its relative path. Rows whose image cannot be decoded are left out and listed in
    the report; a rerun skips files already written with the same recipe."""
    # Imported here: the CLI reads Degradation's defaults for its help without loading storage.
    import pyarrow as pa
    from tqdm import tqdm

    from pipeline import storage
    from pipeline.dataset import inspect, read_table, write_table
    from pipeline.images import decode, encode_png, from_float, image_bytes, to_float
    from pipeline.manifest import Manifest

    storage.check_disjoint(source, destination)
    files = inspect(source, columns).files
    storage.ensure_bucket(destination)
    manifest = Manifest(destination, "degrade")
    finished = manifest.all()  # one read of the records, not one per file
    report = DegradeReport(output=destination)
    # as the manifest will read it back (tuples become lists), so that a rerun compares equal
    recipe = json.loads(json.dumps({"degradation": dataclasses.asdict(degradation), "seed": seed,
                                    "seed_per_image": seed_per_image, **({} if keep_target else {"keep_target": False})}))
    bar = tqdm(total=len(files), desc="degrade", unit="file", disable=not progress, file=sys.stderr)
    for info in files:
        name = storage.relative_path(source, info.uri)  # nested layouts keep their folders
        done = finished.get(name)
        if done and done.get("input_etag") == info.etag and done.get("recipe") == recipe:
            report.files_skipped += 1
            report.images += done.get("rows", 0)
            bar.update(1)
            continue
        table = read_table(info.uri)
        keep, degraded, clean_bytes = [], [], []
        for row, (image_id, value) in enumerate(zip(table[columns.id].to_pylist(), table[columns.image].to_pylist())):
            data, reason = image_bytes(value, base_dir=source, max_bytes=limits.max_bytes)
            decoded = decode(data, limits) if data is not None else None
            if decoded is None or not decoded.ok:
                report.failed.append((info.uri, image_id, reason or decoded.error))
                continue
            clean, alpha = to_float(decoded.pixels, decoded.mode)
            rng = np.random.RandomState(degradation_seed(seed, image_id, seed_per_image))
            noisy = degradation.apply(clean, rng)
            degraded.append(encode_png(from_float(noisy, decoded.mode, alpha), decoded.mode))
            clean_bytes.append(data)
            keep.append(row)
        out = table.take(keep)
        out = out.drop_columns([columns.image] + ([columns.target] if columns.target in out.column_names else []))
        out = out.append_column(columns.image, pa.array(degraded, type=pa.binary()))
        if keep_target:
            out = out.append_column(columns.target, pa.array(clean_bytes, type=pa.binary()))
        write_table(storage.join(destination, name), out)
        manifest.put(name, {"input": info.uri, "input_etag": info.etag, "recipe": recipe, "rows": out.num_rows})
        report.files_written += 1
        report.images += out.num_rows
        bar.update(1)
    bar.close()
    return report
