"""`make demo`: the pipeline end to end on embedded defaults.

    make demo                      # laptop: starts a local S3 server when AWS_ENDPOINT_URL is unset
    AWS_ENDPOINT_URL=... make demo # against an S3 endpoint that is already up

Steps: ingest Set12 into S3, degrade it (Gaussian noise, sigma 25, the quality protocol),
restore a handful of images with a model, print noisy vs restored PSNR.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import metrics, s3server, storage
from pipeline.dataset import read_table
from pipeline.degrade import Degradation
from pipeline.images import decode
from pipeline.ingest import degrade_dataset, ingest
from pipeline.modelio import save_model
from pipeline.models import model_preset
from pipeline.restore_core import ImageRestorer

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO_DIR = REPO / ".demo"


def main() -> int:
    started = time.time()
    server = None
    if not os.environ.get("AWS_ENDPOINT_URL"):
        print("starting a local S3 server (SeaweedFS) for the demo ...", flush=True)
        server = s3server.start(DEMO_DIR / "s3", buckets=("resflow",))
        os.environ.update(server.env())
    try:
        root = "s3://resflow/demo"
        print(f"[1/4] ingest {DATA / 'Set12'} -> {root}/set12/clean", flush=True)
        ingest(str(DATA / "Set12"), f"{root}/set12/clean", progress=False)
        print("[2/4] degrade: Gaussian noise sigma 25, seed 0 (the quality protocol)", flush=True)
        degrade_dataset(f"{root}/set12/clean", f"{root}/set12/noisy25", Degradation(noise_sigma=25), progress=False)
        print("[3/4] model: an untrained dncnn-cpu (training arrives with `resflow train`)", flush=True)
        save_model(f"{root}/models/untrained", model_preset("dncnn-cpu").build())
        print("[4/4] restore 4 images", flush=True)
        restorer = ImageRestorer(f"{root}/models/untrained")
        table = read_table(storage.list_files(f"{root}/set12/noisy25")[0].uri).slice(0, 4)
        restored = restorer({name: np.array(table[name].to_pylist(), dtype=object) for name in table.column_names})
        print(f"\n{'image':<10} {'noisy PSNR':>11} {'restored PSNR':>14}  status")
        for image_id, noisy, target, out, status in zip(restored["image_id"], table["image"].to_pylist(),
                                                        restored["target"], restored["image"], restored["status"]):
            clean = decode(target).pixels
            print(f"{image_id:<10} {metrics.psnr(clean, decode(noisy).pixels):>11.2f} "
                  f"{metrics.psnr(clean, decode(out).pixels):>14.2f}  {status}")
        print(f"\ndone in {time.time() - started:.0f} s; data under {root}/ (endpoint {os.environ['AWS_ENDPOINT_URL']})")
    finally:
        if server is not None:
            s3server.stop(server.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
