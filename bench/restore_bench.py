"""Restoration throughput and memory: the Ray Data pipeline against its own ceiling.

    make bench        # or: .venv/bin/python -m bench.restore_bench [--scale 10] [--preset cpu]
    # a GPU node (CUDA torch): the paper's network, more data, local files
    python -m bench.restore_bench --preset dncnn-paper --scale 100 --storage local

Data: BSD68 with Gaussian noise (sigma 25), 4 images per Parquet file, replicated 1x and
10x; the 10x data again as ONE file (row groups of 4 images: units of work spread it over
the replicas), and a quarter of it as one file (a replica's memory must not grow with the
file it restores). Model: the architecture of the training preset, freshly initialised (speed does not
depend on the weights). All three measurements run here, one after another, on the same
images:

  forward   the model's pure forward pass on images already decoded in memory, the same
            torch thread count in total as the pipeline uses: the ceiling
  loop      a plain single-process loop: pyarrow read, Pillow decode, forward, PNG encode,
            Parquet write
  pipeline  `restore_dataset` end to end (planning, Ray Data start-up, model replicas,
            reads, restoration, encoding, atomic writes, manifest), in a fresh process
            with a fresh local Ray, as `resflow restore` runs; Ray's own start is not timed.
            The 1x data (68 rows) is a small plan: it runs in-process, as the CLI's would

Peak memory is the summed PSS of the pipeline process and all its children (Ray's raylet,
workers, object store), and the largest PSS of a single replica process, sampled once a
second from this process; the S3 server is storage, not pipeline, and is not counted. Writes bench/results/restore_<device>.json (another
--scale: restore_<device>_scale<N>.json).

With CUDA, every measurement runs on the GPU in bf16 (the pipeline as `--gpu`: one replica
per GPU) and the pipeline's GPU busy time is sampled: the share of NVML's samples in which
a kernel ran. `--storage local` keeps the data on local disk instead of a local S3 server.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from local import s3server
from pipeline import raycluster, storage
from pipeline.config import (
    CPU_BATCH_SIZE,
    GPU_BATCH_SIZE,
    RestoreSettings,
    train_preset,
)
from pipeline.dataset import read_table, write_table
from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation
from pipeline.images import decode, encode_png, from_float, to_float
from pipeline.inference import ModelRunner
from pipeline.ingest import ingest
from pipeline.jobs import Events, RestoreJob
from pipeline.modelio import load_model, save_model
from pipeline.models import build_model
from pipeline.restore import restore_dataset

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


class _Sampler:
    """Calls `sample()` on a thread every `interval` seconds while the block runs, until it
    returns False."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()

    def sample(self) -> bool:
        raise NotImplementedError

    def _loop(self):
        while not self._stop.is_set() and self.sample() is not False:
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class PeakMemory(_Sampler):
    """Peak summed PSS of a process tree (default: this one) while the block runs. Sampling
    reads /proc for every process; once a second keeps that cost near 2% of a core."""

    def __init__(self, pid: int | None = None, interval: float = 1.0):
        super().__init__(interval)
        self.pid, self.peak, self.replica_peak = pid, 0, 0

    def sample(self) -> bool:
        try:
            root = psutil.Process(self.pid)
            tree = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        total = 0
        for process in tree:
            try:
                pss = process.memory_full_info().pss
                total += pss
                if "UnitRestorer" in process.name() or "UnitRestorer" in " ".join(process.cmdline()):
                    self.replica_peak = max(self.replica_peak, pss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.peak = max(self.peak, total)
        return True


class GpuBusy(_Sampler):
    """The share of time GPU 0 ran a kernel while the block runs (NVML's utilisation, read
    every 0.2 s); no samples without NVML (pip package nvidia-ml-py)."""

    def __init__(self, interval: float = 0.2):
        super().__init__(interval)
        self.samples = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._read = lambda handle=pynvml.nvmlDeviceGetHandleByIndex(0): \
                pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except Exception:  # no NVML here: nothing to sample
            self._read = None

    def busy(self, start: float, end: float) -> float | None:
        """Busy share between two time.time() stamps."""
        inside = [percent for stamp, percent in self.samples if start <= stamp <= end]
        return sum(inside) / len(inside) / 100 if inside else None

    def sample(self) -> bool:
        if self._read is None:
            return False
        self.samples.append((time.time(), self._read()))
        return True


def replicate(source: str, destination: str, times: int) -> int:
    tables = {info.uri.rsplit("/", 1)[1]: read_table(info.uri) for info in storage.list_files(source)}
    for copy in range(times):
        for base_name, table in tables.items():
            ids = pa.array([f"{copy}/{i}" for i in table["image_id"].to_pylist()])
            write_table(storage.join(destination, f"copy{copy:03d}-{base_name}"), table.set_column(0, "image_id", ids))
    return len(tables) * times


def as_one_file(source: str, destination: str, fraction: float = 1.0) -> int:
    """The files under `source` (the first `fraction` of them) as ONE Parquet file, each
    input file one row group; returns its rows."""
    files = storage.list_files(source)
    files = files[: max(1, round(len(files) * fraction))]
    first = read_table(files[0].uri)
    writer = storage.AtomicWriter(destination)
    rows = 0
    with writer as sink, pq.ParquetWriter(sink, first.schema, compression="zstd") as out:
        for info in files:
            table = read_table(info.uri)
            out.write_table(table, row_group_size=table.num_rows)
            rows += table.num_rows
    return rows


def decoded_images(data: str) -> list[np.ndarray]:
    """Every image of the dataset as float (C, H, W): the forward pass's input, decoded once."""
    images = []
    for info in storage.list_files(data):
        for value in read_table(info.uri, columns=["image"])["image"].to_pylist():
            decoded = decode(value)
            color, _ = to_float(decoded.pixels, decoded.mode)
            images.append(np.ascontiguousarray(color.transpose(2, 0, 1)))
    return images


def pure_forward(model_uri: str, images: list[np.ndarray], threads: int, batch_size: int, device: str = "cpu") -> dict:
    torch.set_num_threads(threads)
    model, _ = load_model(model_uri)
    runner = ModelRunner(model, RestoreSettings(batch_size=batch_size, device=device))
    runner.run(images[:batch_size])  # warm-up: oneDNN picks its kernels on the first call
    passes = []
    for _ in range(3):  # the median of three passes: one pass is short enough to catch a noisy moment
        started = time.perf_counter()
        runner.run(images)
        passes.append(time.perf_counter() - started)
    seconds = sorted(passes)[1]
    megapixels = sum(image.shape[1] * image.shape[2] for image in images) / 1e6
    return {"megapixels": megapixels, "seconds": seconds, "mp_per_s": megapixels / seconds,
            "passes_seconds": passes}


def plain_loop(model_uri: str, data: str, output: str, threads: int, batch_size: int, device: str = "cpu") -> dict:
    torch.set_num_threads(threads)
    model, card = load_model(model_uri)
    runner = ModelRunner(model, RestoreSettings(batch_size=batch_size, device=device))
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
        write_table(storage.join(output, info.uri.rsplit("/", 1)[1]), out)
    seconds = time.perf_counter() - started
    return {"megapixels": megapixels, "seconds": seconds, "mp_per_s": megapixels / seconds}


def pipeline(model_uri: str, data: str, output: str, batch_size: int, use_gpu: bool = False,
             variant: dict | None = None, tree: Path = REPO) -> dict:
    """`restore_dataset` in a child process with its own local Ray; its tree's memory (and
    the GPU's busy time) is sampled here. `variant`: RestoreSettings fields to override;
    `tree`: the checkout whose code runs (bench/restore_side_by_side.py)."""
    spec = {"model": model_uri, "data": data, "output": output, "batch_size": batch_size, "use_gpu": use_gpu,
            "variant": variant or {}}
    command = [sys.executable, "-m", "bench.restore_bench", "--pipeline-run", json.dumps(spec)]
    child = subprocess.Popen(command, cwd=tree, stdout=subprocess.PIPE, text=True)
    with PeakMemory(child.pid) as memory, GpuBusy() as gpu:
        out, _ = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the pipeline run failed (exit {child.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_pss_mb"] = memory.peak / 2**20
    result["replica_peak_pss_mb"] = memory.replica_peak / 2**20
    if gpu.samples:  # while the job ran (Ray's start is not counted), and after its first rows
        end = result["started_at"] + result["seconds"]
        result["gpu_busy"] = gpu.busy(result["started_at"], end)
        result["gpu_busy_after_first_rows"] = gpu.busy(result["started_at"] + result["first_rows_seconds"], end)
    return result


def _wait_until_quiet(cpu_fraction: float = 0.15, timeout: float = 30.0) -> None:
    """Wait until this process tree uses less than `cpu_fraction` of the machine for a second."""
    root = psutil.Process()
    deadline = time.monotonic() + timeout

    def cpu_seconds() -> float:
        total = 0.0
        for process in [root] + root.children(recursive=True):
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    while time.monotonic() < deadline:
        before = cpu_seconds()
        time.sleep(1.0)
        if cpu_seconds() - before < cpu_fraction * (os.cpu_count() or 1):
            return


def pipeline_run(spec: dict) -> None:
    """The child side of `pipeline`: start Ray (not timed), restore, print one JSON line."""
    raycluster.connect(dashboard=False)  # as `resflow restore` starts it
    _wait_until_quiet()  # Ray's raylet is still starting its prestarted workers: part of Ray's start
    notes = []

    class Notes(Events):
        def log(self, message: str) -> None:
            notes.append(message)

    job = RestoreJob(input=spec["data"], output=spec["output"], model=spec["model"], use_gpu=spec["use_gpu"],
                     settings=RestoreSettings(batch_size=spec["batch_size"], **spec["variant"]))
    started_at = time.time()
    report = restore_dataset(job, Notes())
    steady = report.megapixels / max(report.seconds - report.first_rows_seconds, 1e-9)
    print(json.dumps({"started_at": started_at, "megapixels": report.megapixels, "seconds": report.seconds,
                      "mp_per_s": report.megapixels_per_s,
                      "first_rows_seconds": report.first_rows_seconds, "mp_per_s_after_first_rows": steady,
                      "images": report.images_ok, "failed": report.images_failed, "files": report.files_restored,
                      "units": report.units_restored, "rows_by_replica": report.rows_by_replica,
                      "stage_seconds": report.stage_seconds, "notes": notes}), flush=True)


def _variant(text: str) -> dict:
    return {field: int(value) for field, value in (part.split("=") for part in text.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=10, help="the larger dataset is this many copies of BSD68")
    parser.add_argument("--preset", default="cpu", help="training preset whose architecture is benchmarked")
    parser.add_argument("--batch-size", type=int, help=f"rows per model call (default: the pipeline's, "
                                                       f"{CPU_BATCH_SIZE} on CPU, {GPU_BATCH_SIZE} on GPU)")
    parser.add_argument("--storage", choices=("s3", "local"), default="s3",
                        help="s3: a local SeaweedFS server (as the tests); local: files under --dir")
    parser.add_argument("--variant", action="append", default=[], type=_variant, metavar="FIELD=N[,FIELD=N]",
                        help="one more pipeline run at --scale with these RestoreSettings fields (io_threads, "
                             "workers); repeatable")
    parser.add_argument("--dir", default=str(REPO / ".bench" / "s3-restore"))
    parser.add_argument("--pipeline-run", help=argparse.SUPPRESS)  # internal: the measured child process
    args = parser.parse_args()
    if args.pipeline_run:
        pipeline_run(json.loads(args.pipeline_run))
        return
    if args.storage == "local":
        run(args, str(Path(args.dir).resolve() / f"bench-restore-{time.strftime('%Y%m%d-%H%M%S')}"))
        return
    with s3server.embedded(args.dir, buckets=("resflow",)):
        run(args, f"s3://resflow/bench-restore-{time.strftime('%Y%m%d-%H%M%S')}")


def run(args, root: str) -> None:
    use_gpu = torch.cuda.is_available()
    device = "cuda" if use_gpu else "cpu"
    batch_size = args.batch_size or (GPU_BATCH_SIZE if use_gpu else CPU_BATCH_SIZE)
    ingest(str(DATA / "BSD68"), f"{root}/clean", rows_per_file=4, progress=False)
    degrade_dataset(f"{root}/clean", f"{root}/x1", Degradation(noise_sigma=25), progress=False)
    replicate(f"{root}/x1", f"{root}/x{args.scale}", args.scale)
    as_one_file(f"{root}/x{args.scale}", f"{root}/x{args.scale}-one/all.parquet")
    as_one_file(f"{root}/x{args.scale}", f"{root}/x{args.scale}-quarter/all.parquet", fraction=0.25)
    config = train_preset(args.preset)
    torch.manual_seed(0)
    model_uri = f"{root}/model"
    save_model(model_uri, build_model(config.model.architecture, **config.model.architecture_config))
    threads = raycluster.physical_cores()
    print(f"model: {config.model.architecture} {config.model.architecture_config}; {threads} cores; {device}"
          f"{' (' + torch.cuda.get_device_name() + ', bf16)' if use_gpu else ''}; {batch_size} rows per call",
          flush=True)

    # This machine's speed drifts by 10-20% over minutes (shared host), so every measurement
    # is bracketed by forward passes and compared with the mean of the two around it.
    images = decoded_images(f"{root}/x1")

    def forward():
        measured = pure_forward(model_uri, images, threads, batch_size, device)
        print(f"forward  {measured['mp_per_s']:.3f} MP/s", flush=True)
        return measured

    def restore(scale: int, variant: dict | None = None, layout: str = "") -> dict:
        name = f"x{scale}{layout}" + "".join(f"-{field}{value}" for field, value in (variant or {}).items())
        measured = pipeline(model_uri, f"{root}/x{scale}{layout}", f"{root}/out-{name}", batch_size, use_gpu, variant)
        busy = f", GPU busy {measured['gpu_busy']:.0%}" if measured.get("gpu_busy") is not None else ""
        print(f"pipeline {measured['mp_per_s']:.3f} MP/s at {name}, peak {measured['peak_pss_mb']:.0f} MB "
              f"(a replica {measured['replica_peak_pss_mb']:.0f} MB){busy}", flush=True)
        return measured

    forwards = [forward()]
    loop = plain_loop(model_uri, f"{root}/x1", f"{root}/loop-out", threads, batch_size, device)
    print(f"loop     {loop['mp_per_s']:.3f} MP/s", flush=True)
    forwards.append(forward())
    rows = [("plain single-process loop", loop), ("pipeline, 1x", restore(1))]
    forwards.append(forward())
    rows.append((f"pipeline, {args.scale}x", restore(args.scale)))
    forwards.append(forward())
    rows.append((f"pipeline, {args.scale}x as one file", restore(args.scale, layout="-one")))
    forwards.append(forward())
    rows.append((f"pipeline, {args.scale / 4:g}x as one file", restore(args.scale, layout="-quarter")))
    forwards.append(forward())
    for variant in args.variant:
        rows.append((f"pipeline, {args.scale}x, " + ", ".join(f"{k}={v}" for k, v in variant.items()),
                     restore(args.scale, variant)))
        forwards.append(forward())
    for (_, row), (before, after) in zip(rows, itertools.pairwise(forwards)):
        row["forward_mp_per_s"] = (before["mp_per_s"] + after["mp_per_s"]) / 2  # the bracket's reference
        row["vs_forward"] = row["mp_per_s"] / row["forward_mp_per_s"]
        if "mp_per_s_after_first_rows" in row:
            row["after_first_rows_vs_forward"] = row["mp_per_s_after_first_rows"] / row["forward_mp_per_s"]

    loop, small, large, one_file, quarter_file = (row for _, row in rows[:5])
    result = {
        "model": {"name": config.model.architecture, "config": config.model.architecture_config}, "cores": threads, "batch_size": batch_size,
        "device": torch.cuda.get_device_name() if use_gpu else "cpu", "storage": args.storage,
        "forward": forwards, "loop": loop, "pipeline_1x": small, f"pipeline_{args.scale}x": large,
        "ratio_pipeline_vs_forward_1x": small["vs_forward"],
        f"ratio_pipeline_vs_forward_{args.scale}x": large["vs_forward"],
        f"ratio_after_first_rows_vs_forward_{args.scale}x": large["after_first_rows_vs_forward"],
        "ratio_loop_vs_forward": loop["vs_forward"],
        f"memory_ratio_{args.scale}x_vs_1x": large["peak_pss_mb"] / small["peak_pss_mb"],
        f"pipeline_{args.scale}x_one_file": one_file, f"pipeline_{args.scale / 4:g}x_one_file": quarter_file,
        "ratio_one_file_vs_many_files": one_file["mp_per_s"] / large["mp_per_s"],
        "ratio_one_file_vs_many_files_by_forward": one_file["vs_forward"] / large["vs_forward"],
        "replica_memory_ratio_4x_file": one_file["replica_peak_pss_mb"] / quarter_file["replica_peak_pss_mb"],
        f"ratio_pipeline_vs_loop_{args.scale}x": large["mp_per_s"] / loop["mp_per_s"],
        f"ratio_pipeline_vs_loop_{args.scale}x_by_forward": large["vs_forward"] / loop["vs_forward"],
    }
    for variant, (_, row) in zip(args.variant, rows[5:]):
        result[f"pipeline_{args.scale}x_" + "_".join(f"{k}{v}" for k, v in variant.items())] = row
    suffix = "" if args.scale == 10 else f"_scale{args.scale}"  # the default run is what `make bench` records
    out = REPO / "bench" / "results" / f"restore_{'gpu' if use_gpu else 'cpu'}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print()
    print("| measurement | MP | seconds | MP/s | forward MP/s around it | vs forward | first rows after s | "
          "MP/s after them (vs forward) | peak PSS MB (one replica) |" + (" GPU busy (after first rows) |" if use_gpu else ""))
    print("| --- " * (10 if use_gpu else 9) + "|")
    for name, row in rows:
        peak = f"{row['peak_pss_mb']:.0f}" if "peak_pss_mb" in row else ""
        first = f"{row['first_rows_seconds']:.1f}" if "first_rows_seconds" in row else ""
        after = (f"{row['mp_per_s_after_first_rows']:.3f} ({row['after_first_rows_vs_forward']:.2f}x)"
                 if "mp_per_s_after_first_rows" in row else "")
        busy = ""
        if use_gpu:
            busy = (f" {row['gpu_busy']:.0%} ({row['gpu_busy_after_first_rows']:.0%}) |"
                    if row.get("gpu_busy") is not None else " |")
        if "replica_peak_pss_mb" in row:
            peak += f" ({row['replica_peak_pss_mb']:.0f})"
        print(f"| {name} | {row['megapixels']:.1f} | {row['seconds']:.1f} | {row['mp_per_s']:.3f} | "
              f"{row['forward_mp_per_s']:.3f} | {row['vs_forward']:.2f}x | {first} | {after} | {peak} |{busy}")
    rates = ", ".join(f"{measured['mp_per_s']:.3f}" for measured in forwards)
    print(f"\nforward, before and after each measurement: {rates} MP/s; "
          f"memory {args.scale}x / 1x: {result[f'memory_ratio_{args.scale}x_vs_1x']:.2f}")
    print(f"one file vs many files: {result['ratio_one_file_vs_many_files']:.2f}x "
          f"({result['ratio_one_file_vs_many_files_by_forward']:.2f}x by the forward around each; target >= 0.9); "
          f"a replica's peak for a 4x larger file: {result['replica_memory_ratio_4x_file']:.2f}x (target <= 1.1); "
          f"pipeline vs loop at {args.scale}x: {result[f'ratio_pipeline_vs_loop_{args.scale}x']:.2f}x "
          f"({result[f'ratio_pipeline_vs_loop_{args.scale}x_by_forward']:.2f}x by forward)\nwritten to {out}")


if __name__ == "__main__":
    main()
