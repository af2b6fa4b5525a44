"""Scoring a model: PSNR/SSIM of input and output against the clean reference.

    resflow evaluate --model s3://resflow/models --data s3://resflow/set12-n25/          # paired dataset
    resflow evaluate --model s3://resflow/models --data s3://resflow/set12/ --noise-sigma 25  # protocol

With a noise sigma the dataset holds clean images and the noisy input is made by the
quality protocol (docs/architecture.md; float, unclipped, `np.random.seed(0)` per image): the
numbers compare with published tables. Without it the dataset must be paired (`image`
degraded, `target` clean), as `resflow degrade` writes it. `restore_and_score` is also
how training validates every epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from pipeline import metrics, registry
from pipeline.dataset import PAIRED, DatasetError, inspect, iter_batches
from pipeline.degradations import protocol_noisy
from pipeline.images import decode, from_float, max_value, to_float
from pipeline.inference import ModelRunner
from pipeline.jobs import EvaluateJob, Events
from pipeline.modelio import load_model


def restore_and_score(runner: ModelRunner, clean: np.ndarray, degraded: np.ndarray, mode: str) -> dict:
    """Restore a float (H, W, C) `degraded` image and score input and output against
    `clean`, each clipped and rounded to `mode` first (the quality protocol)."""
    restored = runner.restore_images([degraded])[0]
    return metrics.score_restoration(from_float(clean, mode), from_float(degraded, mode), from_float(restored, mode),
                                     max_value(mode))


@dataclass
class Evaluation:
    model_version: str
    data: str
    protocol: str
    noise_sigma: float | None = None  # the protocol's sigma; None for a paired dataset
    images: int = 0
    failed: list = field(default_factory=list)  # (image_id, reason)
    per_image: list = field(default_factory=list)
    seconds: float = 0.0

    def mean(self, key: str) -> float:
        values = [row[key] for row in self.per_image]
        return float(np.mean(values)) if values else float("nan")

    def summary(self) -> dict:
        return {"model_version": self.model_version, "data": self.data, "protocol": self.protocol,
                "noise_sigma": self.noise_sigma, "images": self.images, "failed": len(self.failed),
                **{key: self.mean(key) for key in ("input_psnr", "input_ssim", "output_psnr", "output_ssim")},
                "seconds": round(self.seconds, 2)}

    def to_dict(self, per_image: bool = False) -> dict:
        return {**self.summary(), "failures": self.failed[:20], **({"per_image": self.per_image} if per_image else {})}


def evaluate(job: EvaluateJob, events: Events | None = None) -> Evaluation:
    events = events or Events()
    started = time.time()
    model, card = load_model(registry.resolve(job.model), map_location=job.settings.device)
    runner = ModelRunner(model, job.settings)
    columns = job.columns
    # With noise_sigma the protocol synthesises noise on the image column, target or not.
    inspected = inspect(job.data, columns, use_target=job.noise_sigma is None)
    paired = inspected.kind == PAIRED
    if not paired and job.noise_sigma is None:
        raise DatasetError(f"{job.data} has no target column {columns.target!r}: a paired dataset needs the clean "
                           f"reference; for clean images give noise_sigma (--noise-sigma) to add the protocol's noise")
    total = inspected.rows
    protocol = ("paired dataset" if paired else
                f"synthetic Gaussian noise sigma {job.noise_sigma:g}, seed {job.seed} per image")
    result = Evaluation(card.version, job.data, protocol, job.noise_sigma)
    events.log(f"evaluating {card.version} on {total} images of {job.data} ({protocol})")
    events.progress(0, total)
    wanted = [columns.id, columns.image] + ([columns.target] if paired else [])
    done = 0
    for info in inspected.files:
        for batch in iter_batches(info.uri, batch_size=8, columns=wanted):
            rows = batch.to_pydict()
            for index, image_id in enumerate(rows[columns.id]):
                done += 1
                clean = decode(rows[columns.target if paired else columns.image][index], job.limits, job.data)
                noisy = decode(rows[columns.image][index], job.limits, job.data) if paired else clean
                if not clean.ok or not noisy.ok:
                    result.failed.append((image_id, clean.error or noisy.error))
                    continue
                clean_float, _ = to_float(clean.pixels, clean.mode)  # alpha is not scored
                noisy_float = (to_float(noisy.pixels, noisy.mode)[0] if paired else
                               protocol_noisy(clean_float, job.noise_sigma, job.seed))
                mode = clean.mode.replace("A", "") or "L"
                result.per_image.append({"image_id": image_id,
                                         **restore_and_score(runner, clean_float, noisy_float, mode)})
                result.images += 1
            events.progress(done, total)
    result.seconds = time.time() - started
    return result


def format_evaluation(result: dict) -> str:
    """What `resflow evaluate` prints without --json."""
    lines = []
    if result.get("per_image"):
        lines.append(f"{'image':<24} {'input PSNR':>10} {'output PSNR':>11} {'input SSIM':>10} {'output SSIM':>11}")
        for row in result["per_image"]:
            lines.append(f"{row['image_id']:<24} {row['input_psnr']:>10.2f} {row['output_psnr']:>11.2f} "
                         f"{row['input_ssim']:>10.4f} {row['output_ssim']:>11.4f}")
    lines.append(f"{result['images']} images ({result['protocol']}), model {result['model_version']}: "
                 f"PSNR {result['input_psnr']:.2f} -> {result['output_psnr']:.2f} dB, "
                 f"SSIM {result['input_ssim']:.4f} -> {result['output_ssim']:.4f}")
    lines += [f"failed: {image_id}: {reason}" for image_id, reason in result.get("failures", [])]
    return "\n".join(lines)


def format_sigma_table(results: list[dict]) -> str:
    """What `resflow evaluate --noise-sigma A B C` prints: one row per dataset and sigma."""
    first = results[0]
    names = [_dataset_name(result["data"]) for result in results]
    width = max(7, *(len(name) for name in names))
    lines = [f"model {first['model_version']}",
             f"{'data':<{width}} {'images':>6} {'sigma':>6} {'input PSNR':>10} {'output PSNR':>11} {'input SSIM':>10} "
             f"{'output SSIM':>11}"]
    for name, result in zip(names, results):
        sigma = "paired" if result["noise_sigma"] is None else f"{result['noise_sigma']:g}"
        lines.append(f"{name:<{width}} {result['images']:>6} {sigma:>6} {result['input_psnr']:>10.2f} "
                     f"{result['output_psnr']:>11.2f} {result['input_ssim']:>10.4f} {result['output_ssim']:>11.4f}")
    return "\n".join(lines)


def _dataset_name(uri: str) -> str:
    """The last part of a dataset's URI: what a table row calls it."""
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def run(job: EvaluateJob, events: Events) -> dict:
    """The step contract (pipeline/steps.py): the evaluation as JSON-ready data."""
    return evaluate(job, events).to_dict(per_image=job.per_image)
