"""The noise estimate restoration records and skips by (pipeline/noise.py)."""

import math

import numpy as np
import pytest

from pipeline.degradations import protocol_noisy
from pipeline.images import decode, from_float, to_float
from pipeline.noise import NOISE_BINS, estimate_sigma, noise_bin, noise_summary
from tests.conftest import shared_data

IMAGES = [("Set12", "01.png"), ("Set12", "05.png"), ("BSD68", "test002.png")]


def stored(folder: str, name: str, sigma: float, mode: str = "L") -> np.ndarray:
    """The image under the quality protocol at `sigma`, clipped and quantised as a PNG stores it."""
    decoded = decode((shared_data(folder) / name).read_bytes())
    clean, _ = to_float(decoded.pixels, decoded.mode)
    if mode != "L":
        clean = np.repeat(clean, 3, axis=2)
    return from_float(protocol_noisy(clean, sigma, seed=0), "RGB;16" if mode == "RGB;16" else mode)


@pytest.mark.parametrize("folder,name", IMAGES)
def test_clean_reads_below_3_and_noisy_within_2_of_25(folder, name):
    assert estimate_sigma(stored(folder, name, 0), "L") < 3
    assert abs(estimate_sigma(stored(folder, name, 25), "L") - 25) <= 2


def test_colour_and_sixteen_bit_read_on_the_0_255_scale():
    assert abs(estimate_sigma(stored("Set12", "01.png", 15, "RGB"), "RGB") - 15) <= 1.5
    assert abs(estimate_sigma(stored("Set12", "01.png", 15, "RGB;16"), "RGB;16") - 15) <= 1.5
    with_alpha = np.concatenate([stored("Set12", "01.png", 15, "RGB"), np.full((256, 256, 1), 255, np.uint8)], axis=2)
    assert estimate_sigma(with_alpha, "RGBA") == pytest.approx(estimate_sigma(with_alpha[:, :, :3], "RGB"))


def test_an_image_too_small_to_tell_reads_nan():
    assert math.isnan(estimate_sigma(np.zeros((12, 12), np.uint8), "L"))
    assert not math.isnan(estimate_sigma(np.random.default_rng(0).integers(0, 255, (32, 32), np.uint8), "L"))


def test_noise_summary_bins_and_median():
    counts = [0] * NOISE_BINS
    for sigma in (0.4, 0.6, 2.0, 24.2, 25.5, 400.0):
        counts[noise_bin(sigma)] += 1
    summary = noise_summary(counts)
    assert summary["images"] == 6 and 2 <= summary["median"] <= 25
    assert dict(summary["bins"]) == {"0-1": 2, "1-3": 1, "3-5": 0, "5-10": 0, "10-15": 0, "15-25": 1, "25-35": 1,
                                     "35-50": 0, ">= 50": 1}
    assert noise_summary([0] * NOISE_BINS)["median"] is None


def test_skip_below_must_be_a_sigma():
    from pipeline.config import RestoreSettings

    assert RestoreSettings(skip_below=0).skip_below == 0
    for bad in (-1, math.nan):
        with pytest.raises(ValueError, match="skip_below"):
            RestoreSettings(skip_below=bad)


def test_colour_photographs_read_within_the_issue_bound_and_skip_below_tells_clean_from_noisy():
    """CBSD68 colour images (a subset; bench/noise_estimate.py --data CBSD68 measures all 68)
    with the protocol's noise drawn per RGB value: the median error stays within 1.5 at every
    sigma, and `--skip-below 3` would skip the clean images and none of the noisy ones."""
    paths = sorted(shared_data("CBSD68").glob("*.png"))
    names = [path.name for path in paths[::14]]  # 5 images across the set
    for sigma in (0, 5, 15, 25, 50):
        estimates = []
        for name in names:
            decoded = decode((shared_data("CBSD68") / name).read_bytes())
            clean, _ = to_float(decoded.pixels, decoded.mode)
            assert decoded.mode == "RGB"
            estimates.append(estimate_sigma(from_float(protocol_noisy(clean, sigma, seed=0), "RGB"), "RGB"))
        assert np.median(np.abs(np.array(estimates) - sigma)) <= 1.5, (sigma, estimates)
        assert all(estimate < 3 for estimate in estimates) if sigma == 0 else all(estimate >= 3 for estimate in estimates)


def test_the_estimate_is_the_same_inside_a_bf16_autocast():
    """A noise-map model's caller may estimate inside its forward pass's autocast: bf16
    products read low noise several sigma off, so the estimate keeps float32."""
    import torch

    decoded = decode((shared_data("Set12") / "05.png").read_bytes())
    clean, _ = to_float(decoded.pixels, decoded.mode)
    noisy = protocol_noisy(clean, 3) * np.float32(255)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = estimate_sigma(noisy, "L")
    assert inside == estimate_sigma(noisy, "L") and abs(inside - 3) < 1
