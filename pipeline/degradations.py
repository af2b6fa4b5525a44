"""Synthetic degradations: what turns a clean image into a training or test input.

The Gaussian noise follows the quality protocol (docs/architecture.md; the DnCNN/KAIR convention):
float image in [0, 1], noise N(0, sigma/255) drawn after `np.random.seed(seed)` for each
image, added with no clipping. Steps compose in the order a camera pipeline would apply
them: blur -> downscale -> noise -> JPEG. `resflow degrade` (pipeline/degrade.py) writes a
paired dataset with them; training synthesises them on the fly.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.contract import DecodeLimits, ImageColumns


@dataclass(frozen=True)
class Degradation:
    noise_sigma: float | None = 25.0  # fixed Gaussian sigma on the 0-255 scale; None: no fixed-sigma noise
    noise_sigma_range: tuple[float, float] | None = None  # blind denoising: a sigma drawn uniformly per call (image or training patch)
    jpeg_quality: int | None = None  # JPEG round trip at this quality (1-95)
    blur_sigma: float | None = None  # isotropic Gaussian blur, in pixels
    downscale: int | None = None  # bicubic down by this factor and back up (super-resolution input)

    def __post_init__(self):
        if self.noise_sigma is not None and self.noise_sigma_range is not None:
            raise ValueError("give either noise_sigma or noise_sigma_range, not both")
        if self.noise_sigma is not None and not 0 <= self.noise_sigma <= 255:
            raise ValueError(f"noise_sigma must be within 0..255 (the 8-bit scale), got {self.noise_sigma}")
        if self.noise_sigma_range is not None:
            low, high = self.noise_sigma_range
            if not 0 <= low <= high <= 255:
                raise ValueError(f"noise_sigma_range must satisfy 0 <= low <= high <= 255, got {self.noise_sigma_range}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be within 1..95, got {self.jpeg_quality}")
        if self.blur_sigma is not None and self.blur_sigma <= 0:
            raise ValueError(f"blur_sigma must be positive, got {self.blur_sigma}")
        if self.downscale is not None and self.downscale < 2:
            raise ValueError(f"downscale must be an integer factor >= 2, got {self.downscale}")
        if self.is_identity:
            raise ValueError("the degradation does nothing: set a noise sigma, a sigma range, JPEG quality, blur or downscale")

    @property
    def is_identity(self) -> bool:
        return (self.noise_sigma in (None, 0) and self.noise_sigma_range is None and self.jpeg_quality is None
                and self.blur_sigma is None and self.downscale is None)

    def describe(self) -> str:
        parts = []
        if self.blur_sigma:
            parts.append(f"blur {self.blur_sigma}")
        if self.downscale:
            parts.append(f"downscale x{self.downscale}")
        if self.noise_sigma:
            parts.append(f"noise sigma {self.noise_sigma:g}")
        if self.noise_sigma_range:
            parts.append(f"noise sigma {self.noise_sigma_range[0]:g}-{self.noise_sigma_range[1]:g}")
        if self.jpeg_quality:
            parts.append(f"JPEG q{self.jpeg_quality}")
        return ", ".join(parts)

    def apply(self, clean: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        """Degrade a float32 (H, W, C) image in [0, 1]; the result is float32, unclipped.

        `rng` is a legacy RandomState so that `RandomState(0)` reproduces the
        protocol's `np.random.seed(0); np.random.normal(...)` draw exactly."""
        return self.apply_drawn(clean, rng)[0]

    def apply_drawn(self, clean: np.ndarray, rng: np.random.RandomState) -> tuple[np.ndarray, float]:
        """`apply`, and the noise sigma it drew (0-255; 0 without noise): what a noise-map
        model is told in training. The same draws as `apply`, in the same order."""
        image = clean
        if self.blur_sigma:
            image = gaussian_blur(image, self.blur_sigma)
        if self.downscale:
            image = _resample_round_trip(image, self.downscale)
        sigma = self.noise_sigma
        if self.noise_sigma_range is not None:
            sigma = rng.uniform(*self.noise_sigma_range)
        if sigma:
            image = image + rng.normal(0, sigma / 255.0, image.shape).astype(np.float32)
        if self.jpeg_quality:
            image = _jpeg_round_trip(image, self.jpeg_quality)
        return image.astype(np.float32, copy=False), float(sigma or 0.0)


def protocol_noisy(clean: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """The quality protocol's noisy input: `np.random.seed(seed)` then N(0, sigma/255),
    float, unclipped. `clean` is float (H, W, C) in [0, 1]."""
    rng = np.random.RandomState(seed)
    return (clean.astype(np.float64) + rng.normal(0, sigma / 255.0, clean.shape)).astype(np.float32)


def gaussian_kernel1d(sigma: float, radius: int | None = None) -> np.ndarray:
    radius = radius if radius is not None else max(1, int(3.5 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W, C) with reflected borders."""
    kernel = gaussian_kernel1d(sigma)
    radius = len(kernel) // 2
    out = image.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        length = out.shape[axis]
        out = sum(weight * np.take(padded, np.arange(i, i + length), axis=axis) for i, weight in enumerate(kernel))
    return out.astype(np.float32)


def _per_channel_pil(image: np.ndarray, operation) -> np.ndarray:
    channels = []
    for c in range(image.shape[2]):
        plane = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
        channels.append(np.asarray(operation(plane), dtype=np.float32))
    return np.stack(channels, axis=2)


def _resample_round_trip(image: np.ndarray, factor: int) -> np.ndarray:
    height, width = image.shape[:2]
    small = (max(1, width // factor), max(1, height // factor))
    return _per_channel_pil(image, lambda plane: plane.resize(small, Image.BICUBIC).resize((width, height), Image.BICUBIC))


def _jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    quantised = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    mode = "L" if quantised.shape[2] == 1 else "RGB"
    buffer = io.BytesIO()
    Image.fromarray(quantised[:, :, 0] if mode == "L" else quantised, mode=mode).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32) / 255.0
    return decoded[:, :, None] if decoded.ndim == 2 else decoded


def degradation_seed(seed: int, image_id: str, per_image: bool) -> int:
    """The protocol seeds every image with the same seed (np.random.seed(0) per image);
    `per_image` derives a distinct stream per image id instead."""
    if not per_image:
        return seed
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
