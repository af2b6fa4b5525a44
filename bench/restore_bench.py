"""Restoration throughput and memory: the Ray Data pipeline against its own ceiling.

    make bench        # or: .venv/bin/python -m bench.restore_bench [--scale 10] [--preset cpu]

Data: BSD68 with Gaussian noise (sigma 25), 4 images per Parquet file, replicated 1x and
10x. Model: the architecture of the training preset, freshly initialised (speed does not
depend on the weights). All three measurements run here, in one process tree, on the
same images:

  forward   the model's pure forward pass on images already decoded in memory, the same
            torch thread count in total as the pipeline uses: the ceiling
  loop      a plain single-process loop: pyarrow read, Pillow decode, forward, PNG encode,
            Parquet write
  pipeline  `restore_dataset` end to end (planning, Ray Data actor pool start-up, reads,
            restoration, encoding, atomic writes, manifest), Ray itself already running

Peak memory is the summed PSS of this process and all its children (Ray's raylet,
workers, object store), sampled every 0.2 s. Writes bench/results/restore_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import raycluster, s3server, storage
from pipeline.dataset import read_table
from pipeline.degrade import Degradation
from pipeline.images import decode, encode_png, from_float, to_float
from pipeline.ingest import degrade_dataset, ingest
from pipeline.modelio import load_model, save_model
from pipeline.restore import RestoreJob, restore_dataset
from pipeline.restore_core import ModelRunner, RestoreSettings
from pipeline.models import build_model
from pipeline.train import train_preset

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


class PeakMemory:
    """Peak summed PSS of this process tree while the block runs."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        root = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [root] + root.children(recursive=True):
                try:
                    total += process.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def replicate(source: str, destination: str, times: int) -> int:
    files = storage.list_files(source)
    for copy in range(times):
        for info in files:
            table = read_table(info.uri)
            ids = pa.array([f"{copy}/{i}" for i in table["image_id"].to_pylist()])
            name = f"copy{copy:03d}-{info.uri.rsplit('/', 1)[1]}"
            storage.write_bytes(storage.join(destination, name), _parquet_bytes(table.set_column(0, "image_id", ids)))
    return len(files) * times


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def pure_forward(model_uri: str, data: str, threads: int, batch_size: int) -> dict:
    images = []
    for info in storage.list_files(data):
        for value in read_table(info.uri, columns=["image"])["image"].to_pylist():
            decoded = decode(value)
            color, _ = to_float(decoded.pixels, decoded.mode)
            images.append(np.ascontiguousarray(color.transpose(2, 0, 1)))
    torch.set_num_threads(threads)
    model, _ = load_model(model_uri)
    runner = ModelRunner(model, RestoreSettings(batch_size=batch_size))
    runner.run(images[:batch_size])  # warm-up: oneDNN picks its kernels on the first call
    started = time.perf_counter()
    runner.run(images)
    seconds = time.perf_counter() - started
    megapixels = sum(image.shape[1] * image.shape[2] for image in images) / 1e6
    return {"megapixels": megapixels, "seconds": seconds, "mp_per_s": megapixels / seconds}


def plain_loop(model_uri: str, data: str, output: str, threads: int, batch_size: int) -> dict:
    torch.set_num_threads(threads)
    model, card = load_model(model_uri)
    runner = ModelRunner(model, RestoreSettings(batch_size=batch_size))
    started = time.perf_counter()
    megapixels = 0.0
    for info in storage.list_files(data):
        table = read_table(info.uri)
        decoded = [decode(value) for value in table["image"].to_pylist()]
        floats = [to_float(d.pixels, d.mode)[0] for d in decoded]
        restored = runner.run([np.ascontiguousarray(f.transpose(2, 0, 1)) for f in floats])
        encoded = [encode_png(from_float(r.transpose(1, 2, 0), d.mode), d.mode) for r, d in zip(restored, decoded)]
        megapixels += sum(d.pixels.shape[0] * d.pixels.shape[1] for d in decoded) / 1e6
        out = table.set_column(table.schema.get_field_index("image"), "image", pa.array(encoded, pa.binary()))
        storage.write_bytes(storage.join(output, info.uri.rsplit("/", 1)[1]), _parquet_bytes(out))
    seconds = time.perf_counter() - started
    return {"megapixels": megapixels, "seconds": seconds, "mp_per_s": megapixels / seconds}


def pipeline(model_uri: str, data: str, output: str, batch_size: int) -> dict:
    first_output = {}
    job = RestoreJob(input=data, output=output, model=model_uri, batch_size=batch_size, progress=False)

    def log(message):
        first_output.setdefault("message", message)

    with PeakMemory() as memory:
        report = restore_dataset(job, log=log)
    return {"megapixels": report.megapixels, "seconds": report.seconds, "mp_per_s": report.megapixels_per_s,
            "images": report.images_ok, "failed": report.images_failed, "files": report.files_restored,
            "peak_pss_mb": memory.peak / 2**20, "workers_note": first_output.get("message", "")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=10, help="the larger dataset is this many copies of BSD68")
    parser.add_argument("--preset", default="cpu", help="training preset whose architecture is benchmarked")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dir", default=str(REPO / ".bench" / "s3-restore"))
    args = parser.parse_args()
    with s3server.embedded(args.dir, buckets=("resflow",)):
        run(args)


def run(args) -> None:
    root = f"s3://resflow/bench-restore-{time.strftime('%Y%m%d-%H%M%S')}"
    ingest(str(DATA / "BSD68"), f"{root}/clean", rows_per_file=4, progress=False)
    degrade_dataset(f"{root}/clean", f"{root}/x1", Degradation(noise_sigma=25), progress=False)
    replicate(f"{root}/x1", f"{root}/x{args.scale}", args.scale)
    config = train_preset(args.preset)
    torch.manual_seed(0)
    model_uri = f"{root}/model"
    save_model(model_uri, build_model(config.model, **config.model_config))
    resources = raycluster.connect()
    threads = raycluster.physical_cores()
    print(f"model: {config.model} {config.model_config}; {threads} physical cores; Ray CPUs {resources.get('CPU')}", flush=True)

    forward = pure_forward(model_uri, f"{root}/x1", threads, args.batch_size)
    print(f"forward  {forward['mp_per_s']:.3f} MP/s", flush=True)
    loop = plain_loop(model_uri, f"{root}/x1", f"{root}/loop-out", threads, args.batch_size)
    print(f"loop     {loop['mp_per_s']:.3f} MP/s", flush=True)
    small = pipeline(model_uri, f"{root}/x1", f"{root}/out-x1", args.batch_size)
    print(f"pipeline {small['mp_per_s']:.3f} MP/s at 1x, peak {small['peak_pss_mb']:.0f} MB", flush=True)
    large = pipeline(model_uri, f"{root}/x{args.scale}", f"{root}/out-x{args.scale}", args.batch_size)
    print(f"pipeline {large['mp_per_s']:.3f} MP/s at {args.scale}x, peak {large['peak_pss_mb']:.0f} MB", flush=True)

    result = {
        "model": {"name": config.model, "config": config.model_config}, "cores": threads, "batch_size": args.batch_size,
        "forward": forward, "loop": loop, "pipeline_1x": small, f"pipeline_{args.scale}x": large,
        "ratio_pipeline_vs_forward_1x": small["mp_per_s"] / forward["mp_per_s"],
        f"ratio_pipeline_vs_forward_{args.scale}x": large["mp_per_s"] / forward["mp_per_s"],
        "ratio_pipeline_vs_loop_1x": small["mp_per_s"] / loop["mp_per_s"],
        "ratio_loop_vs_forward": loop["mp_per_s"] / forward["mp_per_s"],
        f"memory_ratio_{args.scale}x_vs_1x": large["peak_pss_mb"] / small["peak_pss_mb"],
    }
    device = "gpu" if torch.cuda.is_available() else "cpu"
    out = REPO / "bench" / "results" / f"restore_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print()
    print("| measurement | MP | seconds | MP/s | vs forward | peak PSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in [("pure forward (decoded in memory)", forward), ("plain single-process loop", loop),
                      ("pipeline, 1x", small), (f"pipeline, {args.scale}x", large)]:
        peak = f"{row['peak_pss_mb']:.0f}" if "peak_pss_mb" in row else ""
        print(f"| {name} | {row['megapixels']:.1f} | {row['seconds']:.1f} | {row['mp_per_s']:.3f} | "
              f"{row['mp_per_s'] / forward['mp_per_s']:.2f}x | {peak} |")
    print(f"\nmemory {args.scale}x / 1x: {result[f'memory_ratio_{args.scale}x_vs_1x']:.2f}; written to {out}")


if __name__ == "__main__":
    main()
