"""Measure what the CPU training preset reaches: Train400 at sigma 25 on this machine.

    .venv/bin/python -m bench.train_quality [--minutes 30] [--workers 2] [--preset cpu]

Starts a local S3 server, ingests Train400 (hash split: 95% train, 5% held out for
validation and checkpoint selection) plus Set12 and BSD68, trains with `resflow train`
through Ray Train, then scores the selected model on Set12 and BSD68 under the quality
protocol, and every kept checkpoint too (PSNR against training minutes). Set12/BSD68 are
only reported, never used to select anything. Writes bench/results/train_<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from local import s3server
from pipeline import storage
from pipeline.config import to_data, train_preset
from pipeline.evaluate import evaluate
from pipeline.ingest import ingest, split_dataset
from pipeline.jobs import EvaluateJob, TrainJob
from pipeline.train import train

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
REFERENCE = {"noisy input": (20.37, 20.50), "BM3D": (29.99, 28.57), "DnCNN-S (17x64)": (30.45, 29.24)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="a headline figure is the median of 3 or more seeds")
    parser.add_argument("--curve", action=argparse.BooleanOptionalAction, default=True,
                        help="score every kept checkpoint on Set12 too (PSNR against minutes; about 5 min more)")
    parser.add_argument("--dir", default=str(REPO / ".bench" / "s3"))
    args = parser.parse_args()
    with s3server.embedded(args.dir, buckets=("resflow",)):
        run(args)


def run(args) -> None:
    root = "s3://resflow/bench"
    ingest(str(DATA / "Train400"), f"{root}/train400/all", rows_per_file=100, progress=False)
    train_rows, val_rows = split_dataset(f"{root}/train400/all", f"{root}/train400/train", f"{root}/train400/val", 0.05)
    for name in ("Set12", "BSD68"):
        ingest(str(DATA / name), f"{root}/{name.lower()}", progress=False)
    print(f"Train400: {train_rows} train / {val_rows} validation images", flush=True)
    config = train_preset(args.preset, workers=args.workers, max_minutes=args.minutes, keep_checkpoints=500,
                          seed=args.seed)
    started = time.time()
    result = train(TrainJob(data=f"{root}/train400/train", val_data=f"{root}/train400/val", registry=f"{root}/models",
                            config=config, run_name=f"bench-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"))
    wall = time.time() - started
    scores = {name: evaluate(EvaluateJob(model=result.model_uri, data=f"{root}/{name.lower()}", noise_sigma=25)).summary()
              for name in ("Set12", "BSD68")}
    curve = []
    history = {row["epoch"]: row for row in result.history}
    checkpoints = sorted({info.uri.rsplit("/", 1)[0] for info in storage.list_files(result.checkpoint_uri, ("model.json",))})
    for checkpoint in checkpoints if args.curve else ():
        from pipeline.modelio import read_card

        epoch = read_card(checkpoint).training.get("epoch")
        if epoch is None or epoch not in history:
            continue
        set12 = evaluate(EvaluateJob(model=checkpoint, data=f"{root}/set12", noise_sigma=25)).summary()["output_psnr"]
        curve.append({"epoch": epoch, "minutes": history[epoch]["elapsed_s"] / 60, "val_psnr": history[epoch]["val_psnr"],
                      "set12_psnr": set12})
    curve.sort(key=lambda row: row["epoch"])
    report = {"preset": args.preset, "seed": args.seed, "config": to_data(config), "train_images": train_rows, "val_images": val_rows,
              "wall_seconds": wall, "model": result.model_uri, "selected_epoch": result.metrics.get("epoch"),
              "val_psnr": result.metrics.get("val_psnr"), "set12": scores["Set12"], "bsd68": scores["BSD68"],
              "curve": curve, "cpus": os.cpu_count(),
              "history": [{key: row.get(key) for key in ("epoch", "elapsed_s", "loss", "val_psnr", "lr")}
                          for row in result.history]}
    out = REPO / "bench" / "results" / f"train_{args.preset}{'' if args.seed == 0 else f'_seed{args.seed}'}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwall time {wall / 60:.1f} min, selected epoch {report['selected_epoch']} (val PSNR {report['val_psnr']:.2f})")
    print(f"{'':<22} {'Set12':>7} {'BSD68':>7}")
    print(f"{'resflow ' + args.preset:<22} {scores['Set12']['output_psnr']:>7.2f} {scores['BSD68']['output_psnr']:>7.2f}")
    print(f"{'(noisy, measured)':<22} {scores['Set12']['input_psnr']:>7.2f} {scores['BSD68']['input_psnr']:>7.2f}")
    for name, (a, b) in REFERENCE.items():
        print(f"{name:<22} {a:>7.2f} {b:>7.2f}")
    print("\nminutes  epoch  val PSNR  Set12 PSNR" if curve else "")
    for row in curve:
        print(f"{row['minutes']:>7.1f} {row['epoch']:>6} {row['val_psnr']:>9.2f} {row['set12_psnr']:>11.2f}")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
