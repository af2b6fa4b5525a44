"""Where a null-model restore's CPU goes: per process, in its steady state, against the loop.

    .venv/bin/python -m bench.cpu_split [--in-process] [-- resflow restore flags, e.g. --units-per-worker 2]

Data as `bench.loop_bench`'s null comparison: BSD68 with sigma-25 noise, 4 images per file,
x4 (272 rows, 68 files) in a local SeaweedFS, and a network that costs nothing (DnCNN 3 x 1).
Runs `resflow restore --executor ray` (replicas only) and then the plain loop on one core,
sampling every process's CPU time from /proc every 0.2 s: the CPU seconds of the whole run
by kind of process (replicas, driver, SeaweedFS, Ray's own), and the cores each kind used
between the first rows + 2 s and the end - 3 s (the steady state). `--in-process` instead
restores BSD68 x 2 in this process on one thread with every stage inline, twice, and prints
its CPU seconds per image and stage seconds: the per-image cost with no Ray and no overlap.
Prints only; the figures are in bench/README.md ("Where the CPU goes").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time

import torch

from bench.loop_bench import DATA, MODELS, REPO, RESFLOW, replicate
from local import s3server
from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation
from pipeline.ingest import ingest
from pipeline.modelio import save_model
from pipeline.models import build_model

TICKS = os.sysconf("SC_CLK_TCK")
KINDS = (("weed", "seaweedfs"), ("MapWorker", "replica"), ("resflow restore", "driver"), ("plain_loop", "loop"),
         ("raylet", "ray (raylet, gcs, daemons)"), ("gcs_server", "ray (raylet, gcs, daemons)"),
         ("ray/", "ray (raylet, gcs, daemons)"), ("ray::", "ray (actors: progress, stats, agents)"))


def cpu_by_process() -> dict[int, tuple[float, str]]:
    """Every process's CPU seconds so far (user + system) and command line."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat_file, open(f"/proc/{pid}/cmdline") as cmd_file:
                stat, command = stat_file.read(), cmd_file.read().replace("\0", " ")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        found[int(pid)] = ((int(fields[11]) + int(fields[12])) / TICKS, command or stat[stat.find("(") + 1:stat.rfind(")")])
    return found


def kind(command: str) -> str:
    return next((name for key, name in KINDS if key in command), "other")


def sampled_run(command: list[str], env: dict) -> tuple[float, dict, list]:
    """Run `command`, sampling /proc meanwhile: wall seconds, its JSON report, the samples."""
    samples, stop = [(time.perf_counter(), cpu_by_process())], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((time.perf_counter(), cpu_by_process()))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed with exit status {done.returncode}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1]), [(at - started, cpu) for at, cpu in samples]


def used_between(samples: list, start: float, end: float) -> collections.Counter:
    """CPU seconds per kind of process between two moments (the nearest samples)."""
    first = min(samples, key=lambda sample: abs(sample[0] - start))[1]
    last = max(samples, key=lambda sample: (sample[0] <= end, sample[0]))[1]
    used = collections.Counter()
    for pid, (seconds, command) in last.items():
        used[kind(command)] += seconds - first.get(pid, (0.0, ""))[0]
    return used


def whole_run(samples: list) -> collections.Counter:
    """CPU seconds per kind over the run, processes born during it counted whole."""
    before, seen = samples[0][1], {}
    for _, cpu in samples:
        seen.update(cpu)
    used = collections.Counter()
    for pid, (seconds, command) in seen.items():
        used[kind(command)] += seconds - (before[pid][0] if pid in before and before[pid][1] == command else 0.0)
    return used


def in_process(root: str) -> None:
    from pipeline.config import RestoreSettings
    from pipeline.jobs import RestoreJob
    from pipeline.restore import restore_dataset

    replicate(f"{root}/x1", f"{root}/x2", 2)
    torch.set_num_threads(1)
    for attempt in range(2):
        wall, cpu = time.perf_counter(), time.process_time()
        report = restore_dataset(RestoreJob(f"{root}/x2", f"{root}/here-{attempt}", f"{root}/null", executor="in-process",
                                            settings=RestoreSettings(threads=1, io_threads=1)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        images = report.images_ok
        print(f"in-process, one thread: {images} images in {wall:.2f} s, {cpu:.2f} CPU s = "
              f"{1000 * cpu / images:.1f} ms per image; stage seconds "
              f"{ {stage: round(seconds, 2) for stage, seconds in report.stage_seconds.items()} }", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--in-process", action="store_true", help="one thread, no Ray: the per-image cost")
    parser.add_argument("--dir", default=str(REPO / ".bench" / "s3-cpu-split"))
    parser.add_argument("restore_flags", nargs="*", help="more `resflow restore` flags (after --)")
    args = parser.parse_args()
    with s3server.embedded(args.dir, buckets=("resflow",)):
        root = f"s3://resflow/cpu-split-{time.strftime('%Y%m%d-%H%M%S')}"
        ingest(str(DATA / "BSD68"), f"{root}/clean", rows_per_file=4, progress=False)
        degrade_dataset(f"{root}/clean", f"{root}/x1", Degradation(noise_sigma=25), progress=False)
        architecture, config = MODELS["null"]()
        torch.manual_seed(0)
        save_model(f"{root}/null", build_model(architecture, **config))
        if args.in_process:
            return in_process(root)
        replicate(f"{root}/x1", f"{root}/x4", 4)
        restore = [RESFLOW, "restore", "--input", f"{root}/x4", "--output", f"{root}/restored", "--model", f"{root}/null",
                   "--json", "--executor", "ray", *args.restore_flags]
        loop = [sys.executable, "-m", "bench.plain_loop", "--input", f"{root}/x4", "--output", f"{root}/loop",
                "--model", f"{root}/null", "--threads", "1", "--compress-level", "1"]
        for label, command, env in (("restore", restore, {}), ("loop on one core", loop, {"OMP_NUM_THREADS": "1"})):
            wall, report, samples = sampled_run(command, env)
            print(f"\n{label}: {wall:.1f} s; CPU seconds over the whole run, by process:")
            for name, seconds in whole_run(samples).most_common():
                print(f"  {name:40s} {seconds:6.2f}")
            if report.get("first_rows_seconds"):
                start, end = report["first_rows_seconds"] + 2, wall - 3
                print(f"  steady state ({end - start:.1f} s after the first rows): cores used")
                for name, seconds in used_between(samples, start, end).most_common():
                    print(f"  {name:40s} {seconds / (end - start):6.2f}")
                print(f"  replicas' busy seconds per stage: "
                      f"{ {stage: round(seconds, 2) for stage, seconds in report['stage_seconds'].items()} }")


if __name__ == "__main__":
    main()
