"""`make demo`: the whole job end to end through the Prefect flows, on embedded defaults.

    make demo                          # nothing running: local S3 server, ephemeral Prefect API, local Ray
    resflow up && make demo            # the stack is up: S3, Prefect server (runs in its UI), Ray jobs on its head
    RESFLOW_DEMO_MINUTES=10 make demo  # train longer

Steps: ingest Train400 (split into train and held-out validation) and Set12 into S3;
degrade Set12 (Gaussian noise, sigma 25, the quality protocol) as the night's incoming
data; run the nightly flow, which finds no champion, trains the CPU preset briefly with
Ray Train, evaluates it on the held-out set, promotes it, and restores the incoming
Set12 with Ray Data; print noisy vs restored PSNR per image, the output location, and
where the runs are in the Prefect UI. Each run writes under a fresh prefix.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO_DIR = REPO / ".demo"


def main() -> int:
    started = time.time()
    minutes = float(os.environ.get("RESFLOW_DEMO_MINUTES", "3"))
    from local import stack

    state = stack.running()
    if state:
        print(f"using the running stack: Prefect UI {state['prefect_ui']}, Ray dashboard {state['ray_dashboard']}",
              flush=True)
        os.environ.update(stack.env())
    elif not os.environ.get("PREFECT_API_URL"):
        # An ephemeral Prefect API (a temporary server per run) with its database here, not in ~/.prefect.
        os.environ.setdefault("PREFECT_HOME", str(DEMO_DIR / "prefect"))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from local import s3server

    if not os.environ.get("AWS_ENDPOINT_URL"):
        print("starting a local S3 server (SeaweedFS) for the demo; its data stays in .demo/s3 ...", flush=True)
    with s3server.embedded(DEMO_DIR / "s3", buckets=("resflow",)):
        run(minutes, started, state)
    return 0


def run(minutes: float, started: float, state: dict | None) -> None:
    from flows.flows import nightly_flow
    from pipeline.degrade import degrade_dataset
    from pipeline.degradations import Degradation
    from pipeline.ingest import ingest, split_dataset

    root = f"s3://resflow/demo/{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[1/3] ingest Train400 and Set12 from {DATA} into {root}/", flush=True)
    ingest(str(DATA / "Train400"), f"{root}/train400/all", rows_per_file=100, progress=False)
    split_dataset(f"{root}/train400/all", f"{root}/train400/train", f"{root}/train400/val", val_fraction=0.05)
    ingest(str(DATA / "Set12"), f"{root}/set12/clean", rows_per_file=6, progress=False)
    print("[2/3] degrade Set12: Gaussian noise sigma 25, seed 0 (the quality protocol) -> tonight's input", flush=True)
    degrade_dataset(f"{root}/set12/clean", f"{root}/incoming", Degradation(noise_sigma=25), progress=False)
    print(f"[3/3] nightly flow: no champion yet, so train the `cpu` preset for {minutes:g} min (Ray Train), "
          f"evaluate on held-out Train400, promote, then restore the input (Ray Data)", flush=True)
    output = f"{root}/restored"
    record = nightly_flow(input=f"{root}/incoming", output=output, registry=f"{root}/models",
                          train_data=f"{root}/train400/train", val_data=f"{root}/train400/val", val_noise_sigma=25,
                          train_preset="cpu", train_minutes=minutes, previews=4)
    decision = record["bootstrap"]
    print(f"\nchampion: {record['champion']} ({decision['reason']}); "
          f"held-out PSNR {decision['scores'][0]['input_psnr']:.2f} -> {decision['scores'][0]['output_psnr']:.2f} dB")
    restore = record["restore"]
    print(f"restored {restore['images_ok']} ok, {restore['images_skipped']} skipped, {restore['images_failed']} failed, "
          f"{restore['megapixels_per_s']:.3f} MP/s")
    print_table(f"{root}/incoming", output)
    print(f"\ndemo finished in {(time.time() - started) / 60:.1f} min.\nrestored Parquet: {output}/\n"
          f"model registry: {root}/models/ (champion.json)\nrun record: {record['record']}\n"
          f"Prefect: {where_the_runs_are(state)}")


def where_the_runs_are(state: dict | None) -> str:
    """Say what this run actually used: the local stack's server, a server PREFECT_API_URL
    named, or a temporary API that is gone now."""
    if state:
        return f"open {state['prefect_ui']}/runs (artifacts: restore-summary with before/after previews)"
    api = os.environ.get("PREFECT_API_URL")
    if api:
        return f"the runs are in the Prefect server at {api} (PREFECT_API_URL); its UI lists them under Runs"
    return "this run used an ephemeral Prefect API, gone with it; `resflow up` first to keep runs in the Prefect UI"


def print_table(noisy_uri: str, restored_uri: str) -> None:
    """Noisy and restored PSNR per image; output rows pair with input rows by position."""
    from pipeline import metrics, storage
    from pipeline.dataset import read_table
    from pipeline.images import decode

    rows = []
    for info in storage.list_files(noisy_uri):
        noisy = read_table(info.uri, columns=["image_id", "image"])
        restored = read_table(storage.join(restored_uri, storage.relative_path(noisy_uri, info.uri)),
                              columns=["image", "target", "status"])
        for image_id, noisy_image, image, target, status in zip(
                noisy["image_id"].to_pylist(), noisy["image"].to_pylist(),
                *(restored[c].to_pylist() for c in ("image", "target", "status"))):
            if status != "ok":
                rows.append((image_id, float("nan"), float("nan")))
                continue
            scores = metrics.score_restoration(decode(target).pixels, decode(noisy_image).pixels, decode(image).pixels)
            rows.append((image_id, scores["input_psnr"], scores["output_psnr"]))
    print(f"\n{'image':<10} {'noisy PSNR':>11} {'restored PSNR':>14}")
    for image_id, before, after in rows:
        print(f"{image_id:<10} {before:>11.2f} {after:>14.2f}")
    print(f"{'mean':<10} {sum(r[1] for r in rows) / len(rows):>11.2f} {sum(r[2] for r in rows) / len(rows):>14.2f}")


if __name__ == "__main__":
    sys.exit(main())
