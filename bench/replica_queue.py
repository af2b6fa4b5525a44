"""Units queued per replica: how long CPU replicas wait between units, side by side.

    .venv/bin/python -m bench.replica_queue [--queued 1 3] [--units 1 2] [--rounds 3]

Data as `bench.loop_bench`'s null comparison: BSD68 with sigma-25 noise, 4 images per file,
x4 (272 rows, 68 one-unit files) in a local SeaweedFS, and a network that costs nothing
(DnCNN 3 x 1), so that the replicas' own work is short and any wait for the next unit shows.
Each round restores it once per `--queued` value (alternating, replicas only: no head
start), with the driver in this process and `driver.UNITS_QUEUED_PER_REPLICA` set to the
value (1 is Ray Data's default for one unit at a time), and with each `--units` at once per
replica (`--units-per-worker`). Per run it prints the replicas'
waits between units (`RestoreReport.replica_idle_seconds`), the steady rate after the first
rows, and the tail: how long after the first replica finished its last unit the last one
finished. Writes bench/results/replica_queue.json (or `--out`); the figures are in bench/README.md
("Units queued per replica").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.loop_bench import DATA, MODELS, REPO, replicate
from local import s3server
from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation
from pipeline.ingest import ingest
from pipeline.jobs import RestoreJob
from pipeline.modelio import save_model
from pipeline.models import build_model
from pipeline.restore import driver, restore_dataset


def restore_once(root: str, output: str, queued: int, units: int) -> dict:
    driver.UNITS_QUEUED_PER_REPLICA = queued
    report = restore_dataset(RestoreJob(f"{root}/x4", output, f"{root}/null", executor="ray", stall_timeout_s=300,
                                        units_per_worker=units))
    return {"queued": queued, "units_at_once": units, "seconds": report.seconds, "first_rows_s": report.first_rows_seconds,
            "replica_idle_s": report.replica_idle_seconds, "replicas": len(report.rows_by_replica),
            "units": report.units_restored, "tail_s": report.replica_tail_seconds,
            "mp_per_s_steady": report.megapixels / max(report.seconds - report.first_rows_seconds, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queued", type=int, nargs="+", default=[1, driver.UNITS_QUEUED_PER_REPLICA])
    parser.add_argument("--units", type=int, nargs="+", default=[driver.CPU_UNITS_AT_ONCE],
                        help="units at once per replica (--units-per-worker) to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "replica_queue.json"))
    parser.add_argument("--dir", default=str(REPO / ".bench" / "s3-queue"))
    args = parser.parse_args()
    runs = []
    with s3server.embedded(args.dir, buckets=("resflow",)):
        root = f"s3://resflow/bench-queue-{time.strftime('%Y%m%d-%H%M%S')}"
        ingest(str(DATA / "BSD68"), f"{root}/clean", rows_per_file=4, progress=False)
        degrade_dataset(f"{root}/clean", f"{root}/x1", Degradation(noise_sigma=25), progress=False)
        replicate(f"{root}/x1", f"{root}/x4", 4)
        architecture, config = MODELS["null"]()
        torch.manual_seed(0)
        save_model(f"{root}/null", build_model(architecture, **config))
        variants = [(queued, units) for queued in args.queued for units in args.units]
        for round_ in range(args.rounds):
            for queued, units in variants:
                run = restore_once(root, f"{root}/out-{round_}-{queued}-{units}", queued, units)
                runs.append(run)
                print(f"round {round_}, {queued} queued, {units} at once: {run['units']} units on {run['replicas']} replicas in "
                      f"{run['seconds']:.1f} s (first rows {run['first_rows_s']:.1f} s, then "
                      f"{run['mp_per_s_steady']:.2f} MP/s); waited {run['replica_idle_s']:.2f} s between units "
                      f"in all; tail {run['tail_s']:.2f} s", flush=True)
    out = Path(args.out)
    out.write_text(json.dumps({"rounds": args.rounds, "runs": runs}, indent=2))
    print("\n| units queued per replica | units at once | waits between units, s (all replicas) | steady MP/s | tail s "
          "| run s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for queued, units in variants:
        mine = [run for run in runs if (run["queued"], run["units_at_once"]) == (queued, units)]

        def cell(key: str) -> str:
            values = [run[key] for run in mine]
            return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

        print(f"| {queued} | {units} | {cell('replica_idle_s')} | {cell('mp_per_s_steady')} | {cell('tail_s')} | "
              f"{cell('seconds')} |")
    print(f"medians, with the range over {args.rounds} rounds; written to {out}")


if __name__ == "__main__":
    main()
