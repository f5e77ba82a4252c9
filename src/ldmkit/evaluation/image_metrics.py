"""Per-image reconstruction metrics for images in [-1, 1]."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mse", "psnr"]


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Per-image mean squared error ``[B]`` of ``x, y [B, ...]``, computed in float64."""
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim < 2:
        raise ValueError(f"expected a batch [B, ...] of images, got shape {tuple(x.shape)}")
    diff = x.detach().to(torch.float64) - y.detach().to(torch.float64)
    return diff.flatten(1).pow(2).mean(dim=1)  # [B, C*H*W] -> [B]


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio in dB for each image of a batch: ``[B, ...] -> [B]`` (float64).

    ``PSNR = 10 log10(data_range^2 / MSE)``, with the MSE averaged over all channels and pixels of
    one image.  The default ``data_range=2`` is the width of [-1, 1], which makes the value equal
    to the usual PSNR of the same images mapped to [0, 1] (both the range and the error halve).
    Identical images give ``inf``.  Values are not clipped first: clamp reconstructions to [-1, 1]
    beforehand if they may overshoot.
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    err = mse(x, y)
    return 10.0 * torch.log10(data_range**2 / err)  # mse == 0 -> log10(inf) = inf
