import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline import metrics
from tests.conftest import shared_data


def pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 256, shape).astype(np.uint8)
    noisy = np.clip(clean + rng.normal(0, 20, shape), 0, 255).round().astype(np.uint8)
    return clean, noisy


@pytest.mark.parametrize("shape", [(64, 64), (37, 51), (40, 30, 3)])
def test_match_scikit_image(shape):
    clean, noisy = pair(shape)
    assert metrics.psnr(clean, noisy) == pytest.approx(peak_signal_noise_ratio(clean, noisy, data_range=255), abs=1e-9)
    reference = structural_similarity(clean, noisy, data_range=255, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, channel_axis=2 if len(shape) == 3 else None)
    assert metrics.ssim(clean, noisy) == pytest.approx(reference, abs=1e-6)


def test_match_scikit_image_on_a_real_image():
    clean = np.asarray(Image.open(shared_data("Set12") / "05.png"))
    _, noisy = pair(clean.shape)
    noisy = np.clip(clean.astype(float) + (noisy.astype(float) - 128) / 4, 0, 255).astype(np.uint8)
    reference = structural_similarity(clean, noisy, data_range=255, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    assert metrics.ssim(clean, noisy) == pytest.approx(reference, abs=1e-6)


def test_identical_images():
    clean, _ = pair((32, 32))
    assert metrics.psnr(clean, clean) == float("inf")
    assert metrics.ssim(clean, clean) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(clean, clean[:-1])
