"""How well and how fast restoration's noise estimate reads an image's noise (pipeline/noise.py).

    make bench        # or: OMP_NUM_THREADS=1 .venv/bin/python -m bench.noise_estimate [--threshold 3]
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.noise_estimate --data CBSD68 --preset cpu-color   # colour

Data: the 68 BSD68 images under the quality protocol (`protocol_noisy`, seed 0) at sigma
0, 5, 15, 25 and 50, then clipped and rounded to uint8 as they would be stored as PNG (so
at sigma 50 clipping has already taken some of the noise away). For each sigma: the
median, mean and largest error of the estimate, and how many images `--skip-below
THRESHOLD` would leave untouched. Cost: the estimate's milliseconds per image against the
forward pass of the `cpu` preset's network (freshly initialised: speed does not depend on
the weights) on the same images, as restoration runs it (`ModelRunner`, rows per call as
restore), timed in turns so that the machine's drift strikes both alike. `make bench` runs
both on one thread (OMP_NUM_THREADS=1, which NumPy's BLAS and torch read as they load), as
each of two CPU replicas on a 2-core machine runs. Writes bench/results/noise_estimate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import RestoreSettings, train_preset
from pipeline.degradations import protocol_noisy
from pipeline.images import decode, from_float, to_float
from pipeline.inference import ModelRunner
from pipeline.models import build_model
from pipeline.noise import estimate_sigma

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RESFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
SIGMAS = (0, 5, 15, 25, 50)


def noisy_images(sigma: float, data: str = "BSD68") -> list[np.ndarray]:
    """A report set at `sigma` as stored: protocol noise (per RGB value for colour),
    clipped, rounded to uint8, (H, W) or (H, W, 3)."""
    images = []
    for path in sorted((DATA / data).glob("*.png")):
        decoded = decode(path.read_bytes())
        clean, _ = to_float(decoded.pixels, decoded.mode)
        images.append(from_float(protocol_noisy(clean, sigma, seed=0), decoded.mode))
    return images


def mode_of(image: np.ndarray) -> str:
    return "RGB" if image.ndim == 3 else "L"


def cost_ms_per_image(images: list[np.ndarray], preset: str, repeats: int) -> tuple[float, float]:
    """Milliseconds per image of the estimate and of the pure forward pass (as a restore
    replica runs it, after one warm-up), measured in turns on the same images so that the
    machine's drift strikes both alike; the medians of `repeats` turns."""
    config = train_preset(preset)
    model = build_model(config.model.architecture, **config.model.architecture_config)
    runner = ModelRunner(model, RestoreSettings())
    planes = [to_float(image, mode_of(image))[0].transpose(2, 0, 1).copy() for image in images]
    runner.run(planes[: runner.settings.rows_per_call])
    estimate, forward = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        for image in images:
            estimate_sigma(image, mode_of(image))
        estimate.append((time.perf_counter() - started) / len(images))
        started = time.perf_counter()
        runner.run(planes)
        forward.append((time.perf_counter() - started) / len(images))
    return 1000 * statistics.median(estimate), 1000 * statistics.median(forward)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threshold", type=float, default=3.0, help="the --skip-below to count skips at")
    parser.add_argument("--preset", default="cpu", help="the training preset whose network the cost is compared with")
    parser.add_argument("--cost-images", type=int, default=16, help="sigma-25 BSD68 images both are timed on")
    parser.add_argument("--repeats", type=int, default=5, help="turns of timing (the median is reported)")
    parser.add_argument("--data", default="BSD68", help="the report set: BSD68 (gray) or CBSD68 (colour)")
    args = parser.parse_args()
    rows = []
    for sigma in SIGMAS:
        images = noisy_images(sigma, args.data)
        estimates = [estimate_sigma(image, mode_of(image)) for image in images]
        errors = np.array(estimates) - sigma
        rows.append({"sigma": sigma, "images": len(images), "median_abs_error": float(np.median(np.abs(errors))),
                     "mean_error": float(errors.mean()), "max_abs_error": float(np.abs(errors).max()),
                     "min_estimate": float(min(estimates)), "max_estimate": float(max(estimates)),
                     "skipped": int(sum(estimate < args.threshold for estimate in estimates))})
        print(f"sigma {sigma:>2}: median |error| {rows[-1]['median_abs_error']:.2f}, mean error "
              f"{rows[-1]['mean_error']:+.2f}, max |error| {rows[-1]['max_abs_error']:.2f}, estimates "
              f"{rows[-1]['min_estimate']:.2f}-{rows[-1]['max_estimate']:.2f}, skipped at {args.threshold:g}: "
              f"{rows[-1]['skipped']}/{len(images)}", flush=True)
    estimate_ms, forward_ms = cost_ms_per_image(noisy_images(25, args.data)[: args.cost_images], args.preset,
                                                args.repeats)
    report = {"data": args.data, "threshold": args.threshold, "sigmas": rows, "estimate_ms_per_image": estimate_ms,
              "forward_ms_per_image": forward_ms, "estimate_share_of_forward": estimate_ms / forward_ms,
              "preset": args.preset, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    print(f"\n| sigma | median abs error | mean error | max abs error | skipped at {args.threshold:g} |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['sigma']} | {row['median_abs_error']:.2f} | {row['mean_error']:+.2f} | "
              f"{row['max_abs_error']:.2f} | {row['skipped']}/{row['images']} |")
    print(f"\nestimate {estimate_ms:.1f} ms per image, forward pass ({args.preset} preset) {forward_ms:.1f} ms per image "
          f"({torch.get_num_threads()} torch thread(s)): "
          f"{100 * estimate_ms / forward_ms:.1f}%")
    out = REPO / "bench" / "results" / ("noise_estimate.json" if args.data == "BSD68" else
                                        f"noise_estimate_{args.data.lower()}.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
