"""Training on what users have, measured at one budget: self-supervised against supervised,
and one blind model against sigma-specific ones.

    .venv/bin/python -m bench.train_variants [--epochs 5] [--preset cpu]

Every run is the same network and the same budget: a fixed number of epochs, so that a
machine busy with something else slows a run down without changing what it learns. A
self-supervised step costs 0.56x a supervised one (sub-images at half size, one no-grad
full-size pass; measured on this machine, cpu preset network, bf16), so its default budget
is the epochs that cost the same compute (`--ss-epochs`, default epochs / 0.56, rounded down):

- `supervised-25`: clean Train400 patches with sigma 25 synthesised (the `cpu` preset);
- `self-supervised-25`: Train400 made noisy once at sigma 25 (`resflow degrade --no-target`,
  a noise stream per image) and nothing else: no clean image is ever read, and validation
  is on noisy-only held-out images (the reference-free score picks the checkpoint);
- `blind`: the `cpu-blind` preset (sigma 0-55, one drawn per patch);
- `specific-15`, `specific-50`: the `cpu` preset at that sigma (`supervised-25` is the 25).

Train400 is hash-split 95/5 (the 5% validates and picks checkpoints); Set12 and BSD68 are
scored under the quality protocol and never used to select anything. Writes
bench/results/train_variants.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from local import s3server
from pipeline.config import to_data, train_preset, with_settings
from pipeline.degrade import degrade_dataset
from pipeline.degradations import Degradation
from pipeline.evaluate import evaluate
from pipeline.ingest import ingest, split_dataset
from pipeline.jobs import EvaluateJob, TrainJob
from pipeline.train import train

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
SETS = ("Set12", "BSD68")
SS_STEP_COST = 0.56  # a self-supervised step's time over a supervised one's (see above)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6, help="the budget of every supervised run")
    parser.add_argument("--ss-epochs", type=int, help="the self-supervised run's budget (default: the same compute)")
    parser.add_argument("--preset", default="cpu", help="the supervised preset; its blind twin is PRESET-blind")
    parser.add_argument("--only", nargs="*", help="run only these variants")
    parser.add_argument("--dir", default=str(REPO / ".bench" / "s3-variants"))
    args = parser.parse_args()
    with s3server.embedded(args.dir, buckets=("resflow",)):
        run(args)


def scores(model: str, root: str, sigma: float) -> dict:
    return {name: evaluate(EvaluateJob(model=model, data=f"{root}/{name.lower()}", noise_sigma=sigma)).summary()
            for name in SETS}


def run(args) -> None:
    root = "s3://resflow/variants"
    ingest(str(DATA / "Train400"), f"{root}/train400/all", rows_per_file=100, progress=False)
    split_dataset(f"{root}/train400/all", f"{root}/train400/train", f"{root}/train400/val", 0.05)
    for name in SETS:
        ingest(str(DATA / name), f"{root}/{name.lower()}", progress=False)
    for part in ("train", "val"):  # noisy-only: the self-supervised run never sees a clean pixel
        degrade_dataset(f"{root}/train400/{part}", f"{root}/noisy25/{part}", Degradation(noise_sigma=25),
                        seed_per_image=True, progress=False, keep_target=False)
    base = train_preset(args.preset, workers=1, epochs=args.epochs, max_minutes=None, keep_checkpoints=2)
    clean = (f"{root}/train400/train", f"{root}/train400/val")
    variants = {
        "supervised-25": (clean, base, (25,)),
        "self-supervised-25": ((f"{root}/noisy25/train", f"{root}/noisy25/val"),
                               with_settings(base, self_supervised=True, epochs=args.ss_epochs or int(args.epochs / SS_STEP_COST)),
                               (25,)),
        "blind": (clean, with_settings(base, degradation=train_preset(f"{args.preset}-blind").data.degradation), (15, 25, 50)),
        "specific-15": (clean, with_settings(base, degradation=Degradation(noise_sigma=15)), (15,)),
        "specific-50": (clean, with_settings(base, degradation=Degradation(noise_sigma=50)), (50,)),
    }
    out = REPO / "bench" / "results" / "train_variants.json"
    report = json.loads(out.read_text()) if out.exists() and args.only else {}
    report.update({"epochs": args.epochs, "preset": args.preset, "cpus": os.cpu_count()})
    for name, ((data, val), config, sigmas) in variants.items():
        if args.only and name not in args.only:
            continue
        started = time.time()
        result = train(TrainJob(data=data, val_data=val, registry=f"{root}/models/{name}", config=config,
                                run_name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"))
        wall = time.time() - started
        report.setdefault("runs", {})[name] = {
            "config": to_data(config), "wall_seconds": wall, "model": result.model_uri, "selected": result.metrics,
            "scores": {str(sigma): {set_name: {key: summary[key] for key in ("input_psnr", "output_psnr", "output_ssim")}
                                    for set_name, summary in scores(result.model_uri, root, sigma).items()}
                       for sigma in sigmas}}
        out.write_text(json.dumps(report, indent=2))
        print(f"{name}: {wall / 60:.1f} min, " + ", ".join(
            f"sigma {sigma}: Set12 {row['Set12']['output_psnr']:.2f} BSD68 {row['BSD68']['output_psnr']:.2f}"
            for sigma, row in report["runs"][name]["scores"].items()), flush=True)
    print_comparison(report)
    print(f"\nwritten to {out}")


def print_comparison(report: dict) -> None:
    runs = report.get("runs", {})

    def psnr(name: str, sigma: int, set_name: str) -> float:
        return runs[name]["scores"][str(sigma)][set_name]["output_psnr"]

    print(f"\n{'comparison (PSNR dB)':<40} {'Set12':>7} {'BSD68':>7}")
    if {"supervised-25", "self-supervised-25"} <= runs.keys():
        for name in ("supervised-25", "self-supervised-25"):
            print(f"{name:<40} {psnr(name, 25, 'Set12'):>7.2f} {psnr(name, 25, 'BSD68'):>7.2f}")
        print(f"{'  self-supervised - supervised':<40} " + " ".join(
            f"{psnr('self-supervised-25', 25, s) - psnr('supervised-25', 25, s):>+7.2f}" for s in SETS))
    specific = {15: "specific-15", 25: "supervised-25", 50: "specific-50"}
    if "blind" in runs:
        for sigma, name in specific.items():
            if name in runs:
                print(f"{f'sigma {sigma}: blind / {name}':<40} " + " ".join(
                    f"{psnr('blind', sigma, s):>7.2f}" for s in SETS) + "   / " + " ".join(
                    f"{psnr(name, sigma, s):.2f}" for s in SETS) + "   gap " + " ".join(
                    f"{psnr('blind', sigma, s) - psnr(name, sigma, s):+.2f}" for s in SETS))


if __name__ == "__main__":
    main()
