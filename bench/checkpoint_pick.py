"""Self-supervised training at a time budget, and picking its checkpoint without references.

    .venv/bin/python -m bench.checkpoint_pick [--minutes 30] [--seed 0] [--preset cpu] \
        [--set patch_size=96 --set batch_size=8 ... --tag NAME]

Train400 is hash-split 95/5 (as `bench.train_quality`) and made noisy once at sigma 25 (a
noise stream per image, the target dropped): the self-supervised run (Neighbor2Neighbor)
never reads a clean pixel, and its validation, noisy-only, reports `val_sure_psnr`,
`val_score` (the mean SURE of the last 3 epochs, which picks the published checkpoint) and
`val_n2n_psnr` every epoch. Every checkpoint is kept.

Afterwards, and only to measure the picks, every checkpoint is scored against the clean
originals of the same held-out noisy images (pairs made with the same seeds, so the same
noise): the true validation PSNR, which no training decision saw. It prints, per epoch,
the scores; for each way to pick (the latest, the best SURE of one epoch or of 3, the best
N2N) the true PSNR of its pick against the best checkpoint's; and Set12 and BSD68 at sigma 25 for the
published model and the latest checkpoint, against the supervised `cpu` preset's 30-minute
median (bench/README.md). Writes bench/results/checkpoint_pick_<preset>_seed<N>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.train_quality import DATA, REPO
from local import s3server
from pipeline import storage
from pipeline.config import to_data, train_preset
from pipeline.dataset import read_table
from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation
from pipeline.evaluate import evaluate
from pipeline.ingest import ingest, split_dataset
from pipeline.jobs import EvaluateJob, TrainJob
from pipeline.modelio import read_card
from pipeline.train import SURE_EPOCHS, train

SUPERVISED_30_MIN = {"Set12": 30.16, "BSD68": 29.04}  # the `cpu` preset, median of 3 seeds (train_cpu*.json)


def images_by_id(uri: str) -> dict:
    return {row["image_id"]: row["image"] for info in storage.list_files(uri)
            for row in read_table(info.uri).select(["image_id", "image"]).to_pylist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a preset setting to change (an int or float, else the text), e.g. patch_size=96")
    parser.add_argument("--tag", help="names the run and its results file: checkpoint_pick_<preset>-<tag>_seed<N>.json")
    parser.add_argument("--dir", default=str(REPO / ".bench" / "s3-pick"))
    args = parser.parse_args()
    with s3server.embedded(args.dir, buckets=("resflow",)):
        run(args)


def setting(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def prepare_data(root: str, paired: tuple[str, ...] = ("val",)) -> None:
    """Train400 split 95/5 and made noisy once at sigma 25, noisy-only (ROOT/noisy/) and, for
    the parts in `paired`, as pairs with their clean originals (ROOT/pairs/, the same noise);
    Set12 and BSD68 clean."""
    ingest(str(DATA / "Train400"), f"{root}/train400/all", rows_per_file=100, progress=False)
    split_dataset(f"{root}/train400/all", f"{root}/train400/train", f"{root}/train400/val", 0.05)
    for name in ("Set12", "BSD68"):
        ingest(str(DATA / name), f"{root}/{name.lower()}", progress=False)
    noise = Degradation(noise_sigma=25)
    for part in ("train", "val"):
        degrade_dataset(f"{root}/train400/{part}", f"{root}/noisy/{part}", noise, seed_per_image=True,
                        progress=False, keep_target=False)
    for part in paired:
        degrade_dataset(f"{root}/train400/{part}", f"{root}/pairs/{part}", noise, seed_per_image=True, progress=False)
        if images_by_id(f"{root}/noisy/{part}") != images_by_id(f"{root}/pairs/{part}"):
            raise RuntimeError(f"the pairs' noisy images differ from the noisy-only {part} set's")


def run(args) -> None:
    root = f"s3://resflow/pick-{time.strftime('%Y%m%d-%H%M%S')}"
    prepare_data(root)
    config = train_preset(args.preset, self_supervised=True, workers=1, max_minutes=args.minutes,
                          keep_checkpoints=1000, seed=args.seed, **dict(setting(item) for item in args.set))
    name = f"{args.preset}-{args.tag}" if args.tag else args.preset
    started = time.time()
    result = train(TrainJob(data=f"{root}/noisy/train", val_data=f"{root}/noisy/val", registry=f"{root}/models",
                            config=config, run_name=f"pick-{name}-seed{args.seed}"))
    wall = time.time() - started
    history = {row["epoch"]: row for row in result.history}
    epochs = []
    for info in storage.list_files(result.checkpoint_uri, ("model.json",)):
        checkpoint = info.uri.rsplit("/", 1)[0]
        epoch = read_card(checkpoint).training.get("epoch")
        if epoch in history:
            true = evaluate(EvaluateJob(model=checkpoint, data=f"{root}/pairs/val")).summary()["output_psnr"]
            epochs.append({key: history[epoch].get(key) for key in ("epoch", "elapsed_s", "loss", "val_sure_psnr",
                                                                    "val_score", "val_n2n_psnr", "lr")} | {"true_val_psnr": true})
    epochs.sort(key=lambda row: row["epoch"])
    picks = {rule: max(epochs, key=lambda row: row[key])
             for rule, key in (("latest", "epoch"), ("best SURE", "val_sure_psnr"),
                               (f"best SURE over {SURE_EPOCHS} epochs (val_score)", "val_score"), ("best N2N", "val_n2n_psnr"),
                               ("best possible (true PSNR)", "true_val_psnr"))}
    latest_checkpoint = max(storage.list_files(result.checkpoint_uri, ("model.json",)),
                            key=lambda info: read_card(info.uri.rsplit("/", 1)[0]).training.get("epoch", -1))
    report_sets = {}
    for label, model in (("published (val_score's pick)", result.model_uri), ("latest", latest_checkpoint.uri.rsplit("/", 1)[0])):
        report_sets[label] = {name: evaluate(EvaluateJob(model=model, data=f"{root}/{name.lower()}", noise_sigma=25)).summary()["output_psnr"]
                              for name in ("Set12", "BSD68")}
    report = {"preset": args.preset, "tag": args.tag, "settings": args.set, "seed": args.seed, "minutes": args.minutes, "config": to_data(config),
              "wall_seconds": wall, "cpus": os.cpu_count(), "published_epoch": result.metrics.get("epoch"),
              "epochs": epochs, "picks": {rule: row["epoch"] for rule, row in picks.items()}, "sigma25": report_sets}
    out = REPO / "bench" / "results" / f"checkpoint_pick_{name}_seed{args.seed}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{len(epochs)} epochs in {wall / 60:.1f} min; published epoch {report['published_epoch']}")
    print("epoch  minutes  val SURE PSNR  val N2N PSNR  true val PSNR")
    for row in epochs:
        print(f"{row['epoch']:>5} {row['elapsed_s'] / 60:>8.1f} {row['val_sure_psnr']:>14.2f} {row['val_n2n_psnr']:>13.3f} "
              f"{row['true_val_psnr']:>14.2f}")
    best = picks["best possible (true PSNR)"]["true_val_psnr"]
    print("\n| pick | epoch | true val PSNR | below the best |\n| --- | --- | --- | --- |")
    for rule, row in picks.items():
        print(f"| {rule} | {row['epoch']} | {row['true_val_psnr']:.2f} | {row['true_val_psnr'] - best:+.2f} |")
    print("\n| model | Set12 | BSD68 |\n| --- | --- | --- |")
    for label, sets in report_sets.items():
        print(f"| {label} | {sets['Set12']:.2f} | {sets['BSD68']:.2f} |")
    print(f"| supervised `cpu`, 30 min, median of 3 | {SUPERVISED_30_MIN['Set12']:.2f} | {SUPERVISED_30_MIN['BSD68']:.2f} |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
