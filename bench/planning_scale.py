"""Planning and recording at scale: the driver's costs that grow with the number of files.

    .venv/bin/python -m bench.planning_scale --files 100000        # against a local SeaweedFS server
    .venv/bin/python -m bench.planning_scale --files 100000 --storage local

Makes N finished files as a restore would leave them (N input files, N outputs, and a
manifest snapshot of N entries), then times `restore.plan` when nothing is new and when
1% is new; and, on the way, the storage costs the capacity model in docs/scaling.md rests
on: PUTs and LIST pages per second, reading and writing the snapshot, recording finished
files in batches. Writes bench/results/planning_<storage>_<N>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from local import s3server
from pipeline import storage
from pipeline.jobs import RestoreJob
from pipeline.manifest import SNAPSHOT, Manifest
from pipeline.modelio import load_model, save_model
from pipeline.models import build_model
from pipeline.restore import plan
from pipeline.restore.records import FileEntry, output_recipe

REPO = Path(__file__).resolve().parents[1]


def tiny_parquet() -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"image_id": ["a"], "image": pa.array([b"\x89PNG"], pa.binary())}), sink)
    return sink.getvalue().to_pybytes()


def put_all(uris: list[str], data: bytes, threads: int) -> float:
    """Seconds to store `data` at every URI with `threads` at once."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda uri: storage.write_bytes(uri, data), uris))
    return time.perf_counter() - started


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def run(root: str, files: int, threads: int) -> dict:
    data = tiny_parquet()
    names = [f"date=2026-12-{day % 28 + 1:02d}/part-{index:07d}.parquet" for index, day in
             zip(range(files), range(files))]
    result: dict = {"files": files, "threads": threads}
    seconds = put_all([storage.join(root, "in", name) for name in names], data, threads)
    result["put_per_s"] = files / seconds
    print(f"{files} input PUTs in {seconds:.1f} s = {result['put_per_s']:.0f}/s ({threads} threads)", flush=True)
    put_all([storage.join(root, "out", name) for name in names], data, threads)
    list_s, inputs = timed(lambda: storage.list_files(root + "/in"))
    result["list_s"] = list_s
    result["list_files_per_s"] = files / list_s
    print(f"listing {len(inputs)} files: {list_s:.2f} s ({files / list_s:.0f} files/s)", flush=True)
    outputs = {storage.relative_path(root + "/out", info.uri): info for info in storage.list_files(root + "/out")}
    model = root + "/model"
    save_model(model, build_model("dncnn", depth=3, width=4), version="tiny")
    version = load_model(model)[1].version
    job = RestoreJob(input=root + "/in", output=root + "/out", model=model)
    entries = {}
    for info in inputs:
        key = storage.relative_path(root + "/in", info.uri)
        entries[key] = FileEntry(input=info.uri, input_etag=info.etag, input_size=info.size,
                                 output=outputs[key].uri, output_etag=outputs[key].etag,
                                 output_size=outputs[key].size, model_version=version, recipe=output_recipe(job),
                                 rows=1, ok=1, failed=0, skipped=0, finished="2026-12-01T02:00:00+00:00").to_json()
    snapshot = json.dumps(entries, sort_keys=True).encode()
    manifest = Manifest(root + "/out")
    write_s, _ = timed(lambda: storage.write_bytes(storage.join(manifest.folder, SNAPSHOT), snapshot))
    read_s, read_back = timed(manifest.all)
    assert len(read_back) == files
    result.update(snapshot_mb=len(snapshot) / 2**20, snapshot_write_s=write_s, snapshot_read_s=read_s)
    print(f"snapshot of {files} entries: {len(snapshot) / 2**20:.1f} MB, written in {write_s:.2f} s, "
          f"read and parsed in {read_s:.2f} s", flush=True)
    plans = [timed(lambda: plan(job)) for _ in range(3)]
    result["plan_nothing_new_s"] = statistics.median(seconds for seconds, _ in plans)
    assert not plans[0][1].files and len(plans[0][1].skipped) == files
    print(f"plan, nothing new: {result['plan_nothing_new_s']:.2f} s (median of 3)", flush=True)
    new = [f"date=2026-12-29/new-{index:07d}.parquet" for index in range(max(1, files // 100))]
    put_all([storage.join(root, "in", name) for name in new], data, threads)
    new_s, planned = timed(lambda: plan(job))
    assert len(planned.files) == len(new)
    result.update(plan_one_percent_new_s=new_s, new_files=len(new))
    print(f"plan, {len(new)} new files (their footers read): {new_s:.2f} s", flush=True)
    batch = {f"k{index}": entries[next(iter(entries))] for index in range(1000)}
    record_s, _ = timed(lambda: Manifest(root + "/batches").put_many(batch))
    result["record_batch_of_1000_s"] = record_s
    single_s = [timed(lambda index=index: Manifest(root + "/single").put(f"k{index}", batch["k0"]))[0]
                for index in range(50)]
    result["record_one_entry_s"] = statistics.median(single_s)
    print(f"recording 1000 finished files in one batch: {record_s * 1000:.0f} ms; one entry alone: "
          f"{result['record_one_entry_s'] * 1000:.1f} ms (median of 50)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=16, help="concurrent PUTs while making the files")
    parser.add_argument("--storage", choices=("s3", "local"), default="s3")
    parser.add_argument("--dir", default=str(REPO / ".bench" / "planning"))
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.storage == "local":
        result = run(str(Path(args.dir).resolve() / f"run-{stamp}"), args.files, args.threads)
    else:
        with s3server.embedded(args.dir, buckets=("bench",)):
            result = run(f"s3://bench/planning-{stamp}", args.files, args.threads)
    result.update(storage=args.storage, cpus=os.cpu_count())
    out = REPO / "bench" / "results" / f"planning_{args.storage}_{args.files}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
