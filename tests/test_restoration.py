"""Restoration scores: SR PSNR/SSIM with a bicubic baseline, hole error and seam error for inpainting."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from ldmkit.data.degradations import bicubic_downsample
from ldmkit.data.masks import random_mask
from ldmkit.evaluation.image_metrics import psnr
from ldmkit.evaluation.restoration import bicubic_baseline, bicubic_upsample, hole_error, seam_error, sr_scores
from ldmkit.evaluation.ssim import ssim


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Photo crops [16, 3, 64, 64] when scikit-image ships them, else smooth random images."""
    if importlib.util.find_spec("skimage") is not None:
        from ldmkit.data.photos import photo_crops

        return photo_crops("train", 64, 16)
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(16, 3, 8, 8, generator=g) * 2 - 1
    fine = torch.rand(16, 3, 32, 32, generator=g) * 0.4 - 0.2
    x = F.interpolate(coarse, size=64, mode="bilinear") + F.interpolate(fine, size=64, mode="bilinear")
    return x.clamp(-1, 1)


@pytest.fixture(scope="module")
def masks() -> torch.Tensor:
    return random_mask("mixed", 16, 64, 64, generator=torch.Generator().manual_seed(0))


def test_sr_scores_match_the_metrics(photos: torch.Tensor) -> None:
    noisy = (photos + 0.05 * torch.randn(photos.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    s = sr_scores(noisy, photos)
    assert set(s) == {"psnr", "ssim"}
    assert s["psnr"] == pytest.approx(float(psnr(noisy, photos).mean()))
    assert s["ssim"] == pytest.approx(float(ssim(noisy, photos).mean()))
    same = sr_scores(photos, photos)
    assert math.isinf(same["psnr"]) and same["ssim"] == pytest.approx(1.0)


def test_sr_scores_clamp_overshoot(photos: torch.Tensor) -> None:
    assert sr_scores(photos * 1.5, photos) == sr_scores((photos * 1.5).clamp(-1, 1), photos)


def test_bicubic_baseline(photos: torch.Tensor) -> None:
    lowres = bicubic_downsample(photos, 4)  # [16, 3, 16, 16]
    base = bicubic_baseline(lowres, photos, 4)
    assert base == sr_scores(bicubic_upsample(lowres, 4), photos)
    # x4 bicubic on 64 px photo crops: about 30 dB and SSIM about 0.8; nearest-neighbour is worse
    assert 22.0 < base["psnr"] < 40.0 and 0.5 < base["ssim"] < 0.97
    nearest = sr_scores(F.interpolate(lowres, scale_factor=4, mode="nearest"), photos)
    assert base["psnr"] > nearest["psnr"] and base["ssim"] > nearest["ssim"]
    with pytest.raises(ValueError, match="does not match target"):
        bicubic_baseline(lowres, photos, 2)
    with pytest.raises(ValueError, match="factor must be"):
        bicubic_baseline(lowres, photos, 0)


def test_sr_scores_errors(photos: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        sr_scores(photos[:, :, :32], photos)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        sr_scores(photos[0], photos[0])


def test_hole_error(photos: torch.Tensor, masks: torch.Tensor) -> None:
    assert hole_error(photos, photos, masks) == 0.0
    # errors outside the hole do not count; inside, the mean absolute error is the offset
    pred = torch.where(masks.bool(), photos + 0.25, photos - 0.7)
    assert hole_error(pred, photos, masks) == pytest.approx(0.25)
    worst = torch.where(masks.bool(), -torch.ones_like(photos), photos)
    assert 0.0 < hole_error(worst, torch.ones_like(photos), masks) == pytest.approx(2.0)


def test_hole_error_errors(photos: torch.Tensor, masks: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="no hole"):
        hole_error(photos, photos, torch.zeros_like(masks))
    with pytest.raises(ValueError, match="only 0"):
        hole_error(photos, photos, masks * 0.5)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        hole_error(photos, photos, masks.expand_as(photos))
    with pytest.raises(ValueError, match="does not match"):
        hole_error(photos, photos, masks[:, :, :32])


def test_seam_error_seamless_is_zero(photos: torch.Tensor, masks: torch.Tensor) -> None:
    assert seam_error(photos, masks, target=photos) == 0.0
    assert abs(seam_error(photos, masks)) < 0.01  # no target: ring vs elsewhere, near 0 for a real image


@pytest.mark.parametrize("fill", [-1.0, 0.0, 1.0])
def test_seam_error_flat_fill_is_larger(photos: torch.Tensor, masks: torch.Tensor, fill: float) -> None:
    flat = torch.where(masks.bool(), torch.full_like(photos, fill), photos)
    with_target = seam_error(flat, masks, target=photos)
    without = seam_error(flat, masks)
    assert with_target > 0.05, with_target
    assert without > 0.05 and without > 10 * abs(seam_error(photos, masks)), without


def test_seam_error_mean_colour_fill(photos: torch.Tensor, masks: torch.Tensor) -> None:
    """Even the image's own mean colour (the best constant) leaves a measurable seam."""
    mean_fill = torch.where(masks.bool(), photos.mean(dim=(2, 3), keepdim=True).expand_as(photos), photos)
    assert seam_error(mean_fill, masks, target=photos) > 0.01


def test_seam_error_synthetic_step() -> None:
    """A smooth ramp with a box filled by a constant 0.5 above its surroundings: the seam is the step."""
    ramp = torch.linspace(-0.5, 0.0, 32).expand(1, 1, 32, 32).clone()  # gradient 0.5/31 per px along x
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    filled = torch.where(mask.bool(), ramp + 0.5, ramp)
    assert seam_error(ramp, mask, target=ramp) == 0.0
    assert seam_error(ramp, mask) == pytest.approx(0.0, abs=1e-6)  # constant gradient everywhere
    s = seam_error(filled, mask, target=ramp)
    assert 0.05 < s < 0.5
    assert seam_error(filled, mask, target=ramp, width=2) < s  # the step is diluted over a wider ring


def test_seam_error_errors(photos: torch.Tensor, masks: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="width"):
        seam_error(photos, masks, width=0)
    with pytest.raises(ValueError, match="no hole boundary"):
        seam_error(photos, torch.zeros_like(masks))
    with pytest.raises(ValueError, match="no hole boundary"):
        seam_error(photos, torch.ones_like(masks))
    with pytest.raises(ValueError, match="no known pixels"):
        seam_error(photos, masks, width=64)
    with pytest.raises(ValueError, match="shapes differ"):
        seam_error(photos, masks, target=photos[:, :1])
