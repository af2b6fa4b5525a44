"""Supervised training on one noise draw per image: how much of the self-supervised gap is the data.

    .venv/bin/python -m bench.one_noise_draw [--minutes 30] [--seed 0] [--preset cpu]

The self-supervised run (`bench.checkpoint_pick`) sees every Train400 image once, noisy at
sigma 25 and stored as 8-bit images (clipped, rounded), the same noise every epoch; the
supervised preset draws fresh float noise every epoch.
This trains the preset, supervised, on those same noisy images paired with their clean
originals (pairs are used as given: no noise is synthesised), so the gap between the two
splits into what that data costs (one draw, clipped 8-bit: not separated here) and what
learning without references costs.
Validation on the held-out pairs picks the checkpoint, as for any paired data; Set12 and
BSD68 at sigma 25 are scored afterwards. Writes bench/results/one_noise_draw_<preset>_seed<N>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.checkpoint_pick import SUPERVISED_30_MIN, prepare_data
from bench.train_quality import REPO
from local import s3server
from pipeline.config import to_data, train_preset
from pipeline.evaluate import evaluate
from pipeline.jobs import EvaluateJob, TrainJob
from pipeline.train import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--dir", default=str(REPO / ".bench" / "s3-one-draw"))
    args = parser.parse_args()
    with s3server.embedded(args.dir, buckets=("resflow",)):
        run(args)


def run(args) -> None:
    root = f"s3://resflow/one-draw-{time.strftime('%Y%m%d-%H%M%S')}"
    prepare_data(root, paired=("train", "val"))
    config = train_preset(args.preset, workers=1, max_minutes=args.minutes, seed=args.seed)
    started = time.time()
    result = train(TrainJob(data=f"{root}/pairs/train", val_data=f"{root}/pairs/val", registry=f"{root}/models",
                            config=config, run_name=f"one-draw-{args.preset}-seed{args.seed}"))
    wall = time.time() - started
    scores = {name: evaluate(EvaluateJob(model=result.model_uri, data=f"{root}/{name.lower()}", noise_sigma=25)).summary()["output_psnr"]
              for name in ("Set12", "BSD68")}
    report = {"preset": args.preset, "seed": args.seed, "minutes": args.minutes, "config": to_data(config),
              "wall_seconds": wall, "cpus": os.cpu_count(), "published_epoch": result.metrics.get("epoch"),
              "history": result.history, "sigma25": scores}
    out = REPO / "bench" / "results" / f"one_noise_draw_{args.preset}_seed{args.seed}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{len(result.history)} epochs in {wall / 60:.1f} min; published epoch {report['published_epoch']}")
    print("| model | Set12 | BSD68 |\n| --- | --- | --- |")
    print(f"| supervised, one noise draw per image | {scores['Set12']:.2f} | {scores['BSD68']:.2f} |")
    print(f"| supervised, fresh noise (`{args.preset}`, 30 min, median of 3) | {SUPERVISED_30_MIN['Set12']:.2f} | "
          f"{SUPERVISED_30_MIN['BSD68']:.2f} |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
