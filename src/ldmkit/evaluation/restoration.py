"""Scores for the restoration tasks: super-resolution (PSNR, SSIM, a bicubic baseline) and inpainting
(error inside the hole, visibility of the seam around it).

All images are ``[B, C, H, W]`` in [-1, 1]; masks are ``[B, 1, H, W]`` with 1 = hole (the pixels the
model generated), as made by ``ldmkit.data.masks``.  Every function returns plain floats averaged over
the batch, ready to print side by side ("ours vs bicubic").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldmkit.evaluation.image_metrics import psnr
from ldmkit.evaluation.ssim import ssim

__all__ = ["bicubic_baseline", "bicubic_upsample", "hole_error", "seam_error", "sr_scores"]


def _check_images(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an image batch [B, C, H, W], got {shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")


def _check_pair(pred: Tensor, target: Tensor) -> None:
    _check_images(pred, "pred")
    _check_images(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")


def sr_scores(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Batch-mean ``{"psnr": dB, "ssim": ...}`` of super-resolved ``pred`` against ground truth ``target``.

    PSNR (``image_metrics.psnr``, data range 2) and SSIM (``ssim.ssim``, Gaussian window 11 x 11,
    sigma 1.5, so images must be at least 11 px a side) are computed per image and then averaged.
    ``pred`` is clamped to [-1, 1] first, as a model's output may overshoot and the metrics assume the
    data range.  PSNR is ``inf`` if some prediction is exact.
    """
    _check_pair(pred, target)
    pred = pred.detach().clamp(-1.0, 1.0)
    target = target.detach()
    return {"psnr": float(psnr(pred, target).mean()), "ssim": float(ssim(pred, target).mean())}


def bicubic_upsample(lowres: Tensor, factor: int) -> Tensor:
    """Bicubic up-sampling ``[B, C, h, w] -> [B, C, h f, w f]`` (torch's cubic, a = -0.75), clamped to [-1, 1]."""
    _check_images(lowres, "lowres")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
    h, w = lowres.shape[-2:]
    up = F.interpolate(lowres.detach().float(), size=(h * factor, w * factor), mode="bicubic", align_corners=False)
    return up.clamp_(-1.0, 1.0)


def bicubic_baseline(lowres: Tensor, target: Tensor, factor: int) -> dict[str, float]:
    """``sr_scores`` of plain bicubic up-sampling of ``lowres`` against ``target``.

    The floor any SR model must beat: printed next to the model's ``sr_scores`` on the same low-res
    inputs, it shows how much the model adds over interpolation.
    """
    up = bicubic_upsample(lowres, factor)
    _check_images(target, "target")
    if up.shape != target.shape:
        raise ValueError(
            f"lowres {tuple(lowres.shape)} up-sampled x{factor} is {tuple(up.shape)}, "
            f"which does not match target {tuple(target.shape)}"
        )
    return sr_scores(up.to(target.dtype), target)


def _hole(mask: Tensor, like: Tensor) -> Tensor:
    """Validate ``mask [B, 1, H, W]`` against images ``like [B, C, H, W]``; return it as bool (1 = hole)."""
    if not isinstance(mask, Tensor) or mask.ndim != 4 or mask.shape[1] != 1:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be [B, 1, H, W], got {shape}")
    if mask.shape[0] != like.shape[0] or mask.shape[-2:] != like.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match images {tuple(like.shape)}")
    m = mask.detach()
    if not ((m == 0) | (m == 1)).all():
        raise ValueError("mask must contain only 0 (known) and 1 (hole)")
    return m.bool()


def hole_error(pred: Tensor, target: Tensor, mask: Tensor) -> float:
    """Mean absolute error inside the hole: ``mean |pred - target|`` over hole pixels and channels.

    In [-1, 1] units, so between 0 and 2.  Pixels outside the hole are left out: a model that pastes
    the known pixels back would otherwise look better the smaller the hole.  Holes of all images are
    pooled (large holes weigh more).
    """
    _check_pair(pred, target)
    hole = _hole(mask, pred).expand_as(pred)  # [B, 1, H, W] -> [B, C, H, W]
    if not hole.any():
        raise ValueError("mask has no hole pixels (no 1s)")
    diff = (pred.detach().double() - target.detach().double()).abs()
    return float(diff[hole].mean())


def _grad_mag(x: Tensor) -> Tensor:
    """Per-pixel gradient magnitude ``[B, 1, H, W]``: central differences (one-sided at the border), channel mean."""
    gy, gx = torch.gradient(x, dim=(-2, -1))  # each [B, C, H, W]
    return (gx * gx + gy * gy).sqrt().mean(dim=1, keepdim=True)


def _boundary_ring(hole: Tensor, width: int) -> Tensor:
    """Pixels within ``width`` (chessboard distance) of the hole boundary, on both sides: dilation minus erosion."""
    k = 2 * width + 1
    h = hole.double()
    dilated = F.max_pool2d(h, k, stride=1, padding=width) > 0
    # erosion as dilation of the complement; the image border counts as hole, so a hole touching the
    # border gets no ring along the border (there is no known pixel there to show a seam against)
    eroded = ~(F.max_pool2d(F.pad(1.0 - h, (width,) * 4, value=0.0), k, stride=1) > 0)
    return dilated & ~eroded


def seam_error(pred: Tensor, mask: Tensor, *, target: Tensor | None = None, width: int = 1) -> float:
    """How much stronger image gradients are on the hole boundary than they should be (a seam score).

    A fill that does not continue its surroundings leaves a visible edge along the hole outline.  Let
    ``R`` be the ring of pixels within ``width`` px of the boundary on both sides (dilation of the hole
    minus its erosion, 3 x 3 neighbourhoods for ``width = 1``), and ``|grad x|`` the per-pixel gradient
    magnitude (central differences, one-sided at the image border, averaged over channels), in [-1, 1]
    units per pixel.  Then, pooling ring pixels over the batch:

    - with ``target`` (the original image): ``mean_R(|grad pred| - |grad target|)``, the gradient
      added at the boundary.  Exactly 0 for ``pred == target``; positive for a seam; around 0 for a fill
      whose texture differs from the original but is as smooth across the boundary;
    - without: ``mean_R |grad pred| - mean_K |grad pred|`` with ``K`` the known pixels outside the ring,
      i.e. the boundary gradient against the image's typical gradient.  Near 0 (not exactly) for a
      seamless image; needs some known pixels outside the ring.

    A hole filled with a flat constant scores clearly above 0 in both forms, from the step at its edge.
    """
    _check_images(pred, "pred")
    if target is not None:
        _check_pair(pred, target)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    hole = _hole(mask, pred)
    ring = _boundary_ring(hole, width)  # [B, 1, H, W]
    if not ring.any():
        raise ValueError("mask has no hole boundary (no hole, or the hole covers every pixel)")
    g_pred = _grad_mag(pred.detach().double())
    if target is not None:
        return float((g_pred - _grad_mag(target.detach().double()))[ring].mean())
    known = ~hole & ~ring
    if not known.any():
        raise ValueError("no known pixels outside the boundary ring to compare with; pass target or a smaller width")
    return float(g_pred[ring].mean() - g_pred[known].mean())
