"""Structural similarity (SSIM; Wang, Bovik, Sheikh & Simoncelli 2004), batched in torch.

Per pixel, with local statistics taken under a Gaussian window w (eq. 14-16, population moments):

    mu_x = w * x,   sigma_x^2 = w * x^2 - mu_x^2,   sigma_xy = w * (x y) - mu_x mu_y
    SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))   (eq. 13)

with ``C1 = (K1 L)^2``, ``C2 = (K2 L)^2``, ``L`` the data range, ``K1 = 0.01``, ``K2 = 0.03`` and an
11x11 circular-symmetric Gaussian window of standard deviation 1.5, normalised to sum 1.  The map is
evaluated only where the window lies inside the image (a "valid" convolution) and averaged over
pixels and channels, giving one number per image.

This reproduces ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=L, channel_axis=...)``: skimage filters with
``scipy.ndimage`` (a separable Gaussian truncated at ``3.5 sigma`` -> radius 5, renormalised) and then
crops the 5-pixel border where the reflected padding was used, which is exactly the valid region.
The separable window is the outer product of two 1-D Gaussians, so it is applied as two 1-D
depthwise convolutions.  Everything runs in float64 by default: ``E[x^2] - E[x]^2`` cancels badly in
float32 for flat regions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_window_1d", "ssim", "ssim_map"]


def gaussian_window_1d(sigma: float = 1.5, win_size: int | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Normalised 1-D Gaussian taps ``[win_size]``; the default size is ``2 * int(3.5 sigma + 0.5) + 1`` (11)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if win_size is None:
        win_size = 2 * int(3.5 * sigma + 0.5) + 1  # scipy.ndimage radius for truncate=3.5, as skimage
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd number, got {win_size}")
    r = win_size // 2
    x = torch.arange(-r, r + 1, dtype=dtype)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim_map(
    x: Tensor,
    y: Tensor,
    data_range: float = 2.0,
    *,
    sigma: float = 1.5,
    win_size: int | None = None,
    k1: float = 0.01,
    k2: float = 0.03,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Local SSIM ``[B, C, H - win_size + 1, W - win_size + 1]`` of images ``x, y [B, C, H, W]`` (eq. 13)."""
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"expected image batches [B, C, H, W], got shape {tuple(x.shape)}")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    if k1 < 0 or k2 < 0:
        raise ValueError(f"K1 and K2 must be non-negative, got {k1} and {k2}")
    g = gaussian_window_1d(sigma, win_size, dtype).to(x.device)  # [K]
    k = g.numel()
    b, c, h, w = x.shape
    if h < k or w < k:
        raise ValueError(f"images of {h}x{w} are smaller than the {k}x{k} SSIM window")

    x = x.detach().to(dtype)
    y = y.detach().to(dtype)
    # the five moments for every channel as one depthwise convolution over 5C channels
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # [B, 5C, H, W]
    n_ch = stack.shape[1]
    w_row = g.view(1, 1, 1, k).expand(n_ch, 1, 1, k)  # [5C, 1, 1, K]
    w_col = g.view(1, 1, k, 1).expand(n_ch, 1, k, 1)  # [5C, 1, K, 1]
    m = F.conv2d(F.conv2d(stack, w_row, groups=n_ch), w_col, groups=n_ch)  # [B, 5C, H-K+1, W-K+1] valid
    mu_x, mu_y, e_xx, e_yy, e_xy = m.split(c, dim=1)  # each [B, C, h', w']
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return num / den


def ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 2.0,
    *,
    sigma: float = 1.5,
    win_size: int | None = None,
    k1: float = 0.01,
    k2: float = 0.03,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Mean SSIM per image ``[B]`` (over channels and valid pixels) of ``x, y [B, C, H, W]``.

    ``data_range`` is the width of the value range: 2.0 for images in [-1, 1] (the package's
    convention), 1.0 for [0, 1], 255 for 8-bit.  Identical images give exactly 1.  Clamp
    reconstructions to the data range first if they may overshoot.
    """
    return ssim_map(x, y, data_range, sigma=sigma, win_size=win_size, k1=k1, k2=k2, dtype=dtype).flatten(1).mean(1)
