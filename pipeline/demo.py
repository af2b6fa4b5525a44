"""`make demo`: the pipeline end to end on embedded defaults.

    make demo                                   # starts a local S3 server when AWS_ENDPOINT_URL is unset
    RESFLOW_DEMO_MINUTES=10 make demo           # train longer
    AWS_ENDPOINT_URL=... RAY_ADDRESS=... make demo   # against running S3 and Ray

Steps: ingest Train400 (split into train and held-out validation) and Set12 into S3;
degrade Set12 (Gaussian noise, sigma 25, the quality protocol); train the CPU preset
briefly with Ray Train; publish it as the registry's champion; restore the noisy Set12
with Ray Data; print noisy vs restored PSNR per image and where the output is.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from pipeline import metrics, registry, s3server, storage
from pipeline.dataset import read_table
from pipeline.degrade import Degradation
from pipeline.images import decode
from pipeline.ingest import degrade_dataset, ingest, split_dataset
from pipeline.restore import RestoreJob, format_report, restore_dataset
from pipeline.train import train, train_preset

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO_DIR = REPO / ".demo"


def main() -> int:
    started = time.time()
    minutes = float(os.environ.get("RESFLOW_DEMO_MINUTES", "3"))
    if not os.environ.get("AWS_ENDPOINT_URL"):
        print("starting a local S3 server (SeaweedFS) for the demo; its data stays in .demo/s3 ...", flush=True)
    with s3server.embedded(DEMO_DIR / "s3", buckets=("resflow",)):
        run(minutes, started)
    return 0


def run(minutes: float, started: float) -> None:
    root = "s3://resflow/demo"
    print(f"[1/5] ingest Train400 and Set12 from {DATA} into {root}/", flush=True)
    ingest(str(DATA / "Train400"), f"{root}/train400/all", rows_per_file=100, progress=False)
    split_dataset(f"{root}/train400/all", f"{root}/train400/train", f"{root}/train400/val", val_fraction=0.05)
    ingest(str(DATA / "Set12"), f"{root}/set12/clean", rows_per_file=6, progress=False)
    print("[2/5] degrade Set12: Gaussian noise sigma 25, seed 0 (the quality protocol)", flush=True)
    degrade_dataset(f"{root}/set12/clean", f"{root}/set12/noisy25", Degradation(noise_sigma=25), progress=False)
    print(f"[3/5] train the `cpu` preset for {minutes:g} min with Ray Train (validation: held-out Train400)", flush=True)
    config = replace(train_preset("cpu"), max_minutes=minutes)
    result = train(f"{root}/train400/train", f"{root}/train400/val", f"{root}/models", config)
    registry.set_champion(f"{root}/models", result.version, reason="demo")
    print(f"[4/5] champion: {result.version} (val PSNR {result.metrics['val_psnr']:.2f} dB)", flush=True)
    print("[5/5] restore the noisy Set12 with Ray Data", flush=True)
    output = f"{root}/set12/restored"
    report = restore_dataset(RestoreJob(input=f"{root}/set12/noisy25", output=output, model=f"{root}/models",
                                        progress=False))
    print(format_report(report))
    print_table(f"{root}/set12/noisy25", output)
    print(f"\ndemo finished in {(time.time() - started) / 60:.1f} min. Restored Parquet: {output}/ "
          f"model registry: {root}/models/. Browse them with `resflow storage up --dir .demo/s3` and "
          f"`eval \"$(resflow storage env --dir .demo/s3)\"`")


def print_table(noisy_uri: str, restored_uri: str) -> None:
    noisy = {}
    for info in storage.list_files(noisy_uri):
        table = read_table(info.uri)
        for image_id, image, target in zip(*(table[c].to_pylist() for c in ("image_id", "image", "target"))):
            noisy[image_id] = (image, target)
    rows = []
    for info in storage.list_files(restored_uri):
        table = read_table(info.uri)
        for image_id, image, status in zip(*(table[c].to_pylist() for c in ("image_id", "image", "status"))):
            noisy_image, target = noisy[image_id]
            clean = decode(target).pixels
            rows.append((image_id, metrics.psnr(clean, decode(noisy_image).pixels),
                         metrics.psnr(clean, decode(image).pixels) if status == "ok" else float("nan")))
    print(f"\n{'image':<10} {'noisy PSNR':>11} {'restored PSNR':>14}")
    for image_id, before, after in sorted(rows):
        print(f"{image_id:<10} {before:>11.2f} {after:>14.2f}")
    print(f"{'mean':<10} {sum(r[1] for r in rows) / len(rows):>11.2f} {sum(r[2] for r in rows) / len(rows):>14.2f}")


if __name__ == "__main__":
    sys.exit(main())
