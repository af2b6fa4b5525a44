"""How noisy an image is: a fast classical estimate of its Gaussian noise sigma.

Restoration records every image's estimate (`noise_sigma`) and, with `skip_below`, leaves
images that need nothing untouched. The estimate is principal component analysis of small
patches taken from the image's weakest texture:

* White noise of sigma adds sigma^2 to every eigenvalue of the patches' covariance, while
  the image's structure fills a few large ones; the noise variance is the mean of the
  smallest eigenvalues, taking as many as still have their mean equal to their median
  (Chen, Zhu and Heng, "An Efficient Statistical Method for Image Noise Level
  Estimation", ICCV 2015), or at most the smallest eigenvalue itself, corrected for the
  spread of a sample covariance's eigenvalues (Marchenko-Pastur). The smaller of the two
  is taken: texture whose spectrum falls smoothly (grain, foliage) has no flat tail for
  the first to find, and the second stays below it.
* Patches are then chosen iteratively as in Liu, Tanaka and Okutomi ("Single-image noise
  level estimation for blind denoising", TIP 2013): those whose gradient energy pure noise
  of the current estimate would reach (at confidence 1 - 1e-6), keeping away from black
  and white, where clipping hides noise. On a clean image the choice narrows to its
  flattest patches and the estimate falls towards zero; on a noisy one it settles at the
  noise.

Patches are taken on a stride with at most MAX_PATCHES of them, so the estimate costs a
small, bounded fraction of a forward pass whatever the image's size; its accuracy on
BSD68 and its cost are in bench/README.md ("Noise estimate").
"""

from __future__ import annotations

import functools
import math

import numpy as np

from pipeline.images import max_value, split_alpha

PATCH = 6  # 36 eigenvalues: small patches find flat ground even in textured images
MAX_PATCHES = 10_000  # a BSD68 image at stride 4 (9,400); a larger image gets a wider stride
MIN_PATCHES = 4 * PATCH * PATCH  # fewer than this and the covariance says little: stop narrowing
CONFIDENCE_Z = 4.75  # a patch of pure noise is kept with probability 1 - 1e-6 (one-sided normal)
CLIP_MARGIN = 2.0  # patch means this many sigmas from black and white: clipping takes < 2% of sigma
ITERATIONS = 10  # enough for the choice of patches to settle (bench/README.md, "Noise estimate")
SETTLED = 0.01  # a change of variance this small (0.5% of sigma) ends the iterations
START_SAMPLE = 4  # the starting upper bound needs only every 4th patch


def estimate_sigma(pixels: np.ndarray, mode: str = "") -> float:
    """The noise sigma of a decoded image on the 0-255 scale (a 16-bit image is scaled
    down), colour channels pooled, alpha ignored; NaN when the image has too few patches to
    tell (smaller than about 15 x 15). `pixels` and `mode` as `images.decode` returns them;
    without a mode, uint16 is taken as 16-bit and every channel as colour."""
    if not mode:
        mode = "I;16" if pixels.dtype == np.uint16 else "L"
        color = pixels if pixels.ndim == 3 else pixels[:, :, None]
    else:
        color, _ = split_alpha(pixels, mode)
    height, width, channels = color.shape
    if min(height, width) < PATCH:
        return math.nan
    places = (height - PATCH + 1) * (width - PATCH + 1) * channels
    stride = max(1, math.ceil(math.sqrt(places / MAX_PATCHES)))
    windows = np.lib.stride_tricks.sliding_window_view(color, (PATCH, PATCH), axis=(0, 1))[::stride, ::stride]
    # (rows, columns, channels, PATCH, PATCH) -> (patches, PATCH, PATCH), on the 0-255 scale
    patches = windows.reshape(-1, PATCH, PATCH).astype(np.float32) * np.float32(255.0 / max_value(mode))
    if len(patches) < MIN_PATCHES:
        return math.nan
    gradient = (np.diff(patches, axis=1) ** 2).sum(axis=(1, 2)) + (np.diff(patches, axis=2) ** 2).sum(axis=(1, 2))
    level = patches.mean(axis=(1, 2))
    patches = patches.reshape(len(patches), PATCH * PATCH)
    variance = covariance_eigenvalues(patches[::START_SAMPLE])[0]  # the smallest: an upper bound to start from
    for _ in range(ITERATIONS):
        sigma = math.sqrt(variance)
        weak = gradient < variance * noise_gradient_quantile()
        chosen = weak & (level >= CLIP_MARGIN * sigma) & (level <= 255.0 - CLIP_MARGIN * sigma)
        if chosen.sum() < MIN_PATCHES:  # an image with no mid-grey ground: clipping it is
            chosen = weak
        if chosen.sum() < MIN_PATCHES:  # nothing this flat: the image is cleaner than the estimate says
            break
        eigenvalues = covariance_eigenvalues(patches[chosen])
        spread = (1.0 - math.sqrt(patches.shape[1] / chosen.sum())) ** 2  # the smallest of pure noise's, in expectation
        estimate = min(noise_variance(eigenvalues), eigenvalues[0] / spread)
        settled = abs(estimate - variance) <= SETTLED * variance
        variance = estimate
        if settled:
            break
    return math.sqrt(max(variance, 0.0))


def covariance_eigenvalues(patches: np.ndarray) -> np.ndarray:
    """Eigenvalues of the patches' covariance, ascending, none below zero (float32 products,
    summed in blocks: the estimates match float64's to 0.01). The product runs in torch, on
    the threads the replica gave the forward pass: NumPy's BLAS would start a pool of its own
    over every core, which on a busy node made it 25x slower (bench/README.md)."""
    import torch

    centred = torch.from_numpy(patches - patches.mean(axis=0, dtype=np.float64).astype(np.float32))
    # Never in bf16, whatever the caller's autocast: at sigma 2-5 it read 0-5 sigma off (bench/README.md).
    with torch.autocast("cpu", enabled=False):
        covariance = (centred.T @ centred).double().numpy() / len(patches)
    return np.clip(np.linalg.eigvalsh(covariance), 0.0, None)


def noise_variance(eigenvalues: np.ndarray) -> float:
    """The mean of the largest prefix of the ascending `eigenvalues` whose mean is also its
    median: as many values above the mean as below it (Chen et al.'s criterion)."""
    counts = np.arange(1, len(eigenvalues) + 1)
    means = np.cumsum(eigenvalues) / counts  # of every prefix; each within its prefix, so counted there
    below = np.searchsorted(eigenvalues, means, side="left")
    above = counts - np.searchsorted(eigenvalues, means, side="right")
    balanced = np.flatnonzero(below == above)
    return float(means[balanced[-1]]) if len(balanced) else float(eigenvalues[0])


@functools.cache
def noise_gradient_quantile() -> float:
    """The gradient energy (sum of squared horizontal and vertical differences) of a patch of
    unit-variance white noise that only 1e-6 of such patches exceed. The energy is x'Kx
    with K = D'D for the difference operator D; as Liu et al. it is taken as a gamma
    variable of the same mean and rank, here through the Wilson-Hilferty approximation of
    the chi-square quantile."""
    differences = []
    for axis in (0, 1):
        for y in range(PATCH - axis):
            for x in range(PATCH - 1 + axis):
                row = np.zeros((PATCH, PATCH))
                row[y, x], row[y + axis, x + 1 - axis] = -1.0, 1.0
                differences.append(row.ravel())
    kernel = np.array(differences).T @ np.array(differences)
    trace, rank = float(np.trace(kernel)), int(np.linalg.matrix_rank(kernel))
    chi_square = rank * (1 - 2 / (9 * rank) + CONFIDENCE_Z * math.sqrt(2 / (9 * rank))) ** 3
    return chi_square * trace / rank


# --- a run's distribution of estimates: counts per whole sigma, summed over units ---------------

NOISE_BINS = 101  # 0-1, 1-2, ..., 99-100, and 100 or more
SUMMARY_EDGES = (0, 1, 3, 5, 10, 15, 25, 35, 50)  # the bins a person reads: clean, light, ..., heavy


def noise_bin(sigma: float) -> int:
    return min(max(int(sigma), 0), NOISE_BINS - 1)


def noise_summary(counts: list[int]) -> dict:
    """The coarse histogram (`SUMMARY_EDGES`, the last bin open) and the median of a run's
    per-sigma counts, the median interpolated within its whole-sigma bin; None without rows."""
    total = sum(counts)
    bins = []
    for low, high in zip(SUMMARY_EDGES, (*SUMMARY_EDGES[1:], None)):
        label = f"{low}-{high}" if high is not None else f">= {low}"
        bins.append((label, sum(counts[low:high if high is not None else len(counts)])))
    median = None
    if total:
        seen = 0
        for sigma, count in enumerate(counts):
            if count and seen + count >= total / 2:
                median = sigma + (total / 2 - seen) / count
                break
            seen += count
    return {"images": total, "median": median, "bins": bins}
