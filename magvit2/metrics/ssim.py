"""SSIM with scikit-image's defaults (7x7 uniform window, sample covariance), as the reference reports it.

skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=1.0) computes SSIM per channel with a
uniform 7x7 filter, crops the 3-pixel border where the filter would read outside the image, and averages. A
'valid' 7x7 average pool gives exactly that interior, so this runs batched on any device (float64, so it agrees
with skimage to ~1e-12 rather than float32 rounding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ssim_uniform(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 7, k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """Per-image SSIM (B,) of (B,C,H,W) images, identical to skimage's default structural_similarity."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim_uniform: x and y must both be (B,C,H,W), got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim_uniform: images {tuple(x.shape[-2:])} are smaller than win_size={win_size}")
    x, y = x.double(), y.double()
    n = win_size * win_size

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, win_size, stride=1)

    ux, uy = mean(x), mean(y)
    cov_norm = n / (n - 1)  # skimage's use_sample_covariance=True
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))  # every channel has the same number of pixels: mean of channel means
