"""`resflow restore` against the loop a user would write, side by side.

    make bench        # or: .venv/bin/python -m bench.loop_bench [--repeats 2] [--quick]

Data: BSD68 with Gaussian noise (sigma 25), 4 images per Parquet file, in a local S3
server (SeaweedFS). Every measurement is a fresh process timed from outside, start-up
included: `resflow restore` with its defaults (the user's command) and `bench.plain_loop`
(one image at a time, Pillow, bf16 autocast where the CPU has it, whole-image forward;
see its docstring). They alternate, loop then pipeline, `--repeats` times, and each
pipeline run is compared with the loop run just before it: this machine is shared, so
only ratios of neighbouring runs mean anything.

  models     the `cpu` training preset's network and DnCNN-S (17 x 64), freshly
             initialised (speed does not depend on the weights), on all of BSD68 (10.5 MP)
  small      one file of 4 images, DnCNN-S: wall time of the whole process (the target:
             restore within 1.5x of the loop)
  null       a network that costs nothing (DnCNN 3 x 1) on BSD68 x 4 (42 MP): the CPU side
             of a restore (read, decode, noise estimate, encode, write, bookkeeping); the
             pipeline on all cores against the loop on one (torch and OpenMP at one thread).
             With defaults (272 rows: local Ray, and the head start meanwhile), start-up
             included and the first rows; and with `--executor ray` (replicas only, no
             head start), each after its first file / first rows: the steady feed rate,
             with one unit at a time per replica (the CPU default) and with two
             (`--units-per-worker 2`: one's storage requests overlapping the other's work)

Writes bench/results/loop_compare.json and prints a table of ratios with their spread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import torch

from local import s3server
from pipeline import storage
from pipeline.config import RestoreSettings, train_preset
from pipeline.dataset import read_table, write_table
from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation
from pipeline.ingest import ingest
from pipeline.modelio import save_model
from pipeline.models import build_model

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
RESFLOW = str(Path(sys.executable).parent / "resflow")  # the console script, as a user runs it

MODELS = {
    "cpu": lambda: (train_preset("cpu").model.architecture, train_preset("cpu").model.architecture_config),
    "dncnn-s": lambda: ("dncnn", {"depth": 17, "width": 64, "batch_norm": True}),
    "null": lambda: ("dncnn", {"depth": 3, "width": 1, "batch_norm": False}),
}


def timed(command: list[str], env: dict | None = None) -> tuple[float, dict]:
    """Run a command; its wall seconds and the JSON of its last stdout line."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed with exit status {done.returncode}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def loop(model: str, data: str, output: str, one_core: bool = False) -> dict:
    command = [sys.executable, "-m", "bench.plain_loop", "--input", data, "--output", output, "--model", model,
               "--compress-level", str(RestoreSettings.png_compress_level)]
    env = {"OMP_NUM_THREADS": "1"} if one_core else {}
    seconds, out = timed(command + (["--threads", "1"] if one_core else []), env)
    return {"wall_s": seconds, "megapixels": out["megapixels"], "mp_per_s": out["megapixels"] / seconds,
            "mp_per_s_steady": out["mp_per_s_after_first_file"], "bf16": out["bf16"]}


def pipeline(model: str, data: str, output: str, extra: list[str] = ()) -> dict:
    command = [RESFLOW, "restore", "--input", data, "--output", output, "--model", model, "--json", *extra]
    seconds, out = timed(command)
    # after a head start's first rows, Ray is still starting: no steady state to read there
    head_start = out.get("units_head_start", 0)
    steady = None if head_start else out["megapixels"] / max(out["seconds"] - out["first_rows_seconds"], 1e-9)
    return {"wall_s": seconds, "megapixels": out["megapixels"], "mp_per_s": out["megapixels"] / seconds,
            "first_rows_s": out["first_rows_seconds"], "mp_per_s_steady": steady, "units_head_start": head_start,
            "executor": out.get("executor", "ray"), "stage_seconds": out.get("stage_seconds", {}),
            "most_units_at_once": out.get("most_units_at_once", 1),
            "replica_idle_s": out.get("replica_idle_seconds", 0.0)}


def steady_cell(entry: dict) -> str:
    ratios = [pair["steady_ratio"] for pair in entry["pairs"]]
    if all(ratios):
        return spread(ratios)
    return "(head start)" if entry["pairs"][0]["pipeline"]["units_head_start"] else "(one file)"


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}x" if len(values) > 1 else f"{values[0]:.2f}x"


def replicate(source: str, destination: str, times: int) -> None:
    tables = {info.uri.rsplit("/", 1)[1]: read_table(info.uri) for info in storage.list_files(source)}
    for copy in range(times):
        for name, table in tables.items():
            ids = table["image_id"].to_pylist()
            write_table(storage.join(destination, f"copy{copy:03d}-{name}"),
                        table.set_column(0, "image_id", pa.array([f"{copy}/{i}" for i in ids])))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2, help="loop/pipeline pairs per comparison")
    parser.add_argument("--quick", action="store_true", help="small and null comparisons only")
    parser.add_argument("--dir", default=str(REPO / ".bench" / "s3-loop"))
    args = parser.parse_args()
    with s3server.embedded(args.dir, buckets=("resflow",)):
        run(args, f"s3://resflow/bench-loop-{time.strftime('%Y%m%d-%H%M%S')}")


def run(args, root: str) -> None:
    ingest(str(DATA / "BSD68"), f"{root}/clean", rows_per_file=4, progress=False)
    degrade_dataset(f"{root}/clean", f"{root}/x1", Degradation(noise_sigma=25), progress=False)
    first = storage.list_files(f"{root}/x1")[0]
    write_table(f"{root}/small/{first.uri.rsplit('/', 1)[1]}", read_table(first.uri))
    replicate(f"{root}/x1", f"{root}/x4", 4)
    models = {}
    for name, spec in MODELS.items():
        architecture, config = spec()
        torch.manual_seed(0)
        models[name] = f"{root}/model-{name}"
        save_model(models[name], build_model(architecture, **config))
    print(f"{os.cpu_count()} CPUs; plain loop vs `resflow restore` defaults, alternating, {args.repeats} pairs each; "
          f"PNG level {RestoreSettings.png_compress_level} in both", flush=True)
    result: dict = {"cpus": os.cpu_count(), "repeats": args.repeats, "comparisons": {}}
    comparisons = [("small", "dncnn-s", "small", False, [])]
    if not args.quick:
        comparisons += [("cpu preset", "cpu", "x1", False, []), ("DnCNN-S", "dncnn-s", "x1", False, [])]
    comparisons += [("null model", "null", "x4", True, []),
                    ("null model, replicas only", "null", "x4", True, ["--executor", "ray"]),
                    ("null model, replicas only, two units at a time", "null", "x4", True,
                     ["--executor", "ray", "--units-per-worker", "2"])]
    counter = 0
    for label, model, data, one_core, extra in comparisons:
        pairs = []
        for _ in range(args.repeats):
            counter += 1
            plain = loop(models[model], f"{root}/{data}", f"{root}/loop-{counter}", one_core)
            piped = pipeline(models[model], f"{root}/{data}", f"{root}/restore-{counter}", extra)
            pairs.append({"loop": plain, "pipeline": piped,
                          "throughput_ratio": piped["mp_per_s"] / plain["mp_per_s"],
                          "wall_ratio": piped["wall_s"] / plain["wall_s"],
                          "steady_ratio": (piped["mp_per_s_steady"] / plain["mp_per_s_steady"]
                                           if plain["mp_per_s_steady"] and piped["mp_per_s_steady"] else None)})
            after = (f"after them {piped['mp_per_s_steady']:.3f}" if piped["mp_per_s_steady"]
                     else f"{piped['units_head_start']} unit(s) by the head start")
            print(f"{label}: loop {plain['wall_s']:.1f} s ({plain['mp_per_s']:.3f} MP/s, after the first file "
                  f"{plain['mp_per_s_steady']:.3f}); restore {piped['wall_s']:.1f} s ({piped['mp_per_s']:.3f} MP/s, "
                  f"first rows {piped['first_rows_s']:.1f} s, {after}; {piped['executor']}, "
                  f"at most {piped['most_units_at_once']} unit(s) at once per replica, waiting "
                  f"{piped['replica_idle_s']:.2f} s in all between units)", flush=True)
        result["comparisons"][label] = {"model": model, "data": data, "loop_one_core": one_core, "args": extra,
                                        "pairs": pairs}
    out = REPO / "bench" / "results" / "loop_compare.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("\n| comparison | loop s | restore s | restore vs loop, MP/s (start-up included) | wall time ratio | "
          "steady-state MP/s ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, entry in result["comparisons"].items():
        pairs = entry["pairs"]
        loops = ", ".join(f"{pair['loop']['wall_s']:.1f}" for pair in pairs)
        restores = ", ".join(f"{pair['pipeline']['wall_s']:.1f}" for pair in pairs)
        print(f"| {label}{' (loop on one core)' if entry['loop_one_core'] else ''} | {loops} | {restores} | "
              f"{spread([p['throughput_ratio'] for p in pairs])} | {spread([p['wall_ratio'] for p in pairs])} | "
              f"{steady_cell(entry)} |")
    null = result["comparisons"]["null model, replicas only"]["pairs"]
    rate = sorted(pair["pipeline"]["mp_per_s_steady"] for pair in null)[len(null) // 2]
    cores = os.cpu_count() or 1
    print(f"\nnull-model feed rate: {rate:.2f} MP/s on {cores} cores = {rate / cores:.2f} MP/s per core; "
          f"a GPU at 120 MP/s (DnCNN-S bf16) needs ~{120 / (rate / cores):.0f} cores\nwritten to {out}")


if __name__ == "__main__":
    main()
