"""The restore pipeline of this checkout against another commit's, side by side on the same
data, alternating, so that the machine's drift falls on both alike.

    git worktree add --detach ../resflow-before HEAD~1
    .venv/bin/python -m bench.restore_side_by_side ../resflow-before [--scales 10 30] [--rounds 2]

Data and model as `bench/restore_bench.py` (BSD68 with sigma-25 noise, 4 images per file,
replicated; the `cpu` preset's network, freshly initialised); each run is that bench's
measured child process (`--pipeline-run`: a fresh process with a fresh local Ray, Ray's own
start not timed) with the given checkout as its working directory, so its code runs. Prints
each run and, per scale, the median MP/s of each side and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch

from bench.restore_bench import DATA, REPO, pipeline, replicate
from local import s3server
from pipeline.config import CPU_BATCH_SIZE, train_preset
from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation
from pipeline.ingest import ingest
from pipeline.modelio import save_model
from pipeline.models import build_model


def commit_of(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("before", type=Path, help="a checkout of the commit to compare with")
    parser.add_argument("--scales", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side per scale, alternating")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--dir", default=str(REPO / ".bench" / "s3-side-by-side"))
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": REPO}
    names = {side: f"{side} ({commit_of(tree)})" for side, tree in trees.items()}
    with s3server.embedded(args.dir, buckets=("resflow",)):
        root = f"s3://resflow/side-by-side-{time.strftime('%Y%m%d-%H%M%S')}"
        ingest(str(DATA / "BSD68"), f"{root}/clean", rows_per_file=4, progress=False)
        degrade_dataset(f"{root}/clean", f"{root}/x1", Degradation(noise_sigma=25), progress=False)
        config = train_preset(args.preset)
        torch.manual_seed(0)
        save_model(f"{root}/model", build_model(config.model.architecture, **config.model.architecture_config))
        summary = []
        for scale in args.scales:
            replicate(f"{root}/x1", f"{root}/x{scale}", scale)
            rates: dict[str, list[float]] = {side: [] for side in trees}
            for round_ in range(args.rounds):
                order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
                for side in order:
                    run = pipeline(f"{root}/model", f"{root}/x{scale}", f"{root}/out-{side}-x{scale}-{round_}",
                                   CPU_BATCH_SIZE, tree=trees[side])
                    rates[side].append(run["mp_per_s"])
                    print(f"x{scale} {names[side]}: {run['mp_per_s']:.3f} MP/s, {run['seconds']:.1f} s, first rows "
                          f"after {run['first_rows_seconds']:.1f} s, {run['images']} images, peak "
                          f"{run['peak_pss_mb']:.0f} MB", flush=True)
            before, after = (statistics.median(rates[side]) for side in ("before", "after"))
            summary.append(f"| {scale}x | {before:.3f} | {after:.3f} | {after / before:.2f}x |")
    print(f"\n| data | {names['before']} MP/s (median of {args.rounds}) | {names['after']} MP/s | after / before |")
    print("| --- | --- | --- | --- |")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
