"""Scoring a model: PSNR/SSIM of input and output against the clean reference.

    resflow evaluate --model s3://resflow/models --data s3://resflow/set12-n25/          # paired dataset
    resflow evaluate --model s3://resflow/models --data s3://resflow/set12/ --noise-sigma 25  # protocol

With `--noise-sigma` the dataset holds clean images and the noisy input is made by the
quality protocol of DESIGN.md (float, unclipped, `np.random.seed(0)` per image): the
numbers compare with published tables. Without it the dataset must be paired (`image`
degraded, `target` clean), as `resflow degrade` writes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from pipeline import registry
from pipeline.dataset import check_dataset, iter_batches
from pipeline.degrade import protocol_noisy
from pipeline.images import DecodeLimits, ImageColumns, decode, from_float, to_float
from pipeline.metrics import psnr, ssim
from pipeline.modelio import load_model
from pipeline.restore_core import ModelRunner, RestoreSettings


@dataclass
class Evaluation:
    model_version: str
    data: str
    protocol: str
    images: int = 0
    failed: list = field(default_factory=list)
    per_image: list = field(default_factory=list)
    seconds: float = 0.0

    def mean(self, key: str) -> float:
        values = [row[key] for row in self.per_image]
        return float(np.mean(values)) if values else float("nan")

    def summary(self) -> dict:
        return {"model_version": self.model_version, "data": self.data, "protocol": self.protocol,
                "images": self.images, "failed": len(self.failed),
                "input_psnr": self.mean("input_psnr"), "input_ssim": self.mean("input_ssim"),
                "output_psnr": self.mean("output_psnr"), "output_ssim": self.mean("output_ssim"),
                "seconds": round(self.seconds, 2)}


def restore_float(runner: ModelRunner, image: np.ndarray) -> np.ndarray:
    """Restore a float (H, W, C) image; a gray model restores colour channel by channel."""
    planes = image.transpose(2, 0, 1)
    if runner.channels == planes.shape[0]:
        return runner.run([np.ascontiguousarray(planes)])[0].transpose(1, 2, 0)
    if runner.channels == 1:
        restored = runner.run([np.ascontiguousarray(plane[None]) for plane in planes])
        return np.concatenate(restored, axis=0).transpose(1, 2, 0)
    raise ValueError(f"a {runner.channels}-channel model cannot restore a {planes.shape[0]}-channel image")


def evaluate(model_uri: str, data: str, noise_sigma: float | None = None, seed: int = 0,
             columns: ImageColumns = ImageColumns(), settings: RestoreSettings = RestoreSettings()) -> Evaluation:
    started = time.time()
    model, card = load_model(registry.resolve(model_uri), map_location=settings.device)
    runner = ModelRunner(model, settings)
    paired = noise_sigma is None
    files = check_dataset(data, columns, need_target=paired)
    protocol = "paired dataset" if paired else f"synthetic Gaussian noise sigma {noise_sigma:g}, seed {seed} per image"
    result = Evaluation(card.version, data, protocol)
    limits = DecodeLimits()
    wanted = [columns.id, columns.image] + ([columns.target] if paired else [])
    for info in files:
        for batch in iter_batches(info.uri, batch_size=8, columns=wanted):
            rows = batch.to_pydict()
            for index, image_id in enumerate(rows[columns.id]):
                clean = decode(rows[columns.target if paired else columns.image][index], limits, data)
                noisy = decode(rows[columns.image][index], limits, data) if paired else clean
                if not clean.ok or not noisy.ok:
                    result.failed.append((image_id, clean.error or noisy.error))
                    continue
                clean_float, _ = to_float(clean.pixels, clean.mode)  # alpha is not scored
                noisy_float = to_float(noisy.pixels, noisy.mode)[0] if paired else protocol_noisy(clean_float, noise_sigma, seed)
                restored = restore_float(runner, noisy_float)
                mode = clean.mode.replace("A", "") or "L"
                top = 65535.0 if clean.mode == "I;16" else 255.0
                reference = from_float(clean_float, mode)
                noisy_q, output_q = from_float(noisy_float, mode), from_float(restored, mode)
                result.per_image.append({
                    "image_id": image_id,
                    "input_psnr": psnr(reference, noisy_q, top), "input_ssim": ssim(reference, noisy_q, top),
                    "output_psnr": psnr(reference, output_q, top), "output_ssim": ssim(reference, output_q, top),
                })
                result.images += 1
    result.seconds = time.time() - started
    return result
