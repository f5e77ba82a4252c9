"""Dynamic thresholding of x0 estimates (Saharia et al. 2022, "Imagen", sec. 2.3), as a denoiser wrapper.

At each step, s = the p-th quantile of |x0_hat| per sample, s = max(s, 1); x0_hat is clipped to [-s, s] and
divided by s. It keeps pixel-space samples inside [-1, 1] under strong guidance; it only makes sense for
models whose x0 lives in a bounded range (pixels, not latents).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .parameterization import Denoiser


def dynamic_threshold(x0: Tensor, percentile: float = 0.995, max_value: float = 1.0) -> Tensor:
    """Imagen's dynamic thresholding of one batch of x0 estimates [B, ...]."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must be in (0, 1], got {percentile}")
    s = torch.quantile(x0.detach().abs().flatten(1).float(), percentile, dim=1)  # [B]
    s = s.clamp(min=max_value).to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))  # [B, 1, 1, 1]
    return x0.clamp(-s, s) / s * max_value


def thresholded(denoiser: Denoiser, percentile: float = 0.995, max_value: float = 1.0) -> Denoiser:
    """Wrap `denoiser(x_t, t) -> x0` so that every x0 estimate is dynamically thresholded."""

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return dynamic_threshold(denoiser(x, t), percentile, max_value)

    return fn
