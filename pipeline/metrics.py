"""PSNR and SSIM as the quality protocol measures them (docs/architecture.md).

Both take uint8 (or uint16) arrays: the restored image is clipped and rounded before it
is scored, as in DnCNN/KAIR. PSNR over all pixels with no border crop; SSIM with an
11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03, averaged over the valid region
(equal to scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)`, which crops the same 5-pixel border) and over channels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.degradations import gaussian_kernel1d


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0) -> float:
    if reference.shape != test.shape:
        raise ValueError(f"psnr: shapes differ, {reference.shape} vs {test.shape}")
    mse = np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2)
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(data_range**2 / mse))


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0) -> float:
    if reference.shape != test.shape:
        raise ValueError(f"ssim: shapes differ, {reference.shape} vs {test.shape}")
    if min(reference.shape[:2]) < 11:
        raise ValueError(f"ssim needs at least 11x11 pixels, got {reference.shape[:2]}")
    x = _as_planes(reference)
    y = _as_planes(test)
    kernel_1d = torch.from_numpy(gaussian_kernel1d(1.5, radius=5)).double()
    rows, columns = kernel_1d.view(1, 1, 1, 11), kernel_1d.view(1, 1, 11, 1)

    def blur(z: torch.Tensor) -> torch.Tensor:
        # valid: no padding, the border is cropped like the reference. The 11x11 Gaussian is
        # separable: two 11-tap passes equal it to 1e-12 and are ~11x faster in float64
        # (8.4 -> 0.7 s per CBSD68 colour image, bench/README.md "Colour").
        return F.conv2d(F.conv2d(z, rows), columns)

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sigma_xx = blur(x * x) - mu_x**2
    sigma_yy = blur(y * y) - mu_y**2
    sigma_xy = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (sigma_xx + sigma_yy + c2)
    per_channel = (numerator / denominator).mean(dim=(1, 2, 3))
    return float(per_channel.mean())


def score_restoration(reference: np.ndarray, degraded: np.ndarray, restored: np.ndarray,
                      data_range: float = 255.0) -> dict:
    """PSNR and SSIM of the degraded input and of the restored output against the clean
    reference, all three quantised to the same mode: the one scoring path that training's
    validation, `resflow evaluate`, the flows' artifacts and the demo share."""
    return {"input_psnr": psnr(reference, degraded, data_range), "input_ssim": ssim(reference, degraded, data_range),
            "output_psnr": psnr(reference, restored, data_range), "output_ssim": ssim(reference, restored, data_range)}


# The probe's step on the 0-1 scale: small enough that the network is linear across it,
# large enough that float32 resolves the difference it makes (TF32 would not: turned off).
SURE_EPSILON = 1e-3


def sure_mse(network: torch.nn.Module, noisy: torch.Tensor, sigma: float, probe: torch.Tensor,
             epsilon: float = SURE_EPSILON) -> float:
    """The mean squared error of `network(noisy)` against the clean image it never sees:
    Stein's unbiased risk estimate for Gaussian noise of std `sigma` (the 0-1 scale of the
    pixels), ||f(y) - y||^2 / n - sigma^2 + 2 sigma^2 div f(y) / n, with the divergence
    from one random `probe` (Monte-Carlo SURE, Ramani et al. 2008): b . (f(y + eps b) - f(y)) / eps.
    `noisy` (1, C, H, W) as the network takes it, `probe` of the same shape, the network in
    eval mode (a batch norm that updates, or dropout, has no divergence to estimate); in
    float32. Unclipped: the error of the float output, before the protocol's rounding."""
    cuda = noisy.device.type == "cuda"
    with torch.no_grad(), torch.autocast(noisy.device.type, enabled=False), \
            torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=not cuda):
        output = network(noisy).float()
        nudged = network(noisy + epsilon * probe).float()
        pixels = noisy.numel()
        divergence = float((probe * (nudged - output)).sum()) / epsilon
        residual = float(((output - noisy) ** 2).sum())
    return residual / pixels - sigma**2 + 2 * sigma**2 * divergence / pixels


def _as_planes(array: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) -> float64 (C, 1, H, W)."""
    planes = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(np.ascontiguousarray(planes.transpose(2, 0, 1), dtype=np.float64))[:, None]
