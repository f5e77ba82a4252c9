"""Super-resolution inputs: antialiased bicubic down-sampling and the BSR-like random chain."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from ldmkit.data.degradations import bicubic_downsample, bsr_degrade
from ldmkit.evaluation.image_metrics import psnr


def _images(size: int, n: int, channels: int = 3) -> torch.Tensor:
    """Photo crops in [-1, 1] when scikit-image ships them, else smooth random images (same statistics role)."""
    if importlib.util.find_spec("skimage") is not None:
        from ldmkit.data.photos import photo_crops

        x = photo_crops("train", size, n)
    else:
        g = torch.Generator().manual_seed(0)
        coarse = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
        fine = torch.rand(n, 3, size // 2, size // 2, generator=g) * 0.4 - 0.2
        x = F.interpolate(coarse, size=size, mode="bilinear") + F.interpolate(fine, size=size, mode="bilinear")
        x = x.clamp(-1, 1)
    return x.mean(1, keepdim=True) if channels == 1 else x


@pytest.fixture(scope="module")
def photos32() -> torch.Tensor:
    return _images(32, 32)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("h", "w", "factor"), [(32, 32, 4), (64, 64, 4), (32, 48, 4), (32, 32, 2), (24, 24, 3)])
def test_shapes_and_range(channels: int, h: int, w: int, factor: int) -> None:
    x = torch.rand(3, channels, h, w, generator=_gen(0)) * 2 - 1
    for y in (bicubic_downsample(x, factor), bsr_degrade(x, factor, generator=_gen(1))):
        assert y.shape == (3, channels, h // factor, w // factor)
        assert y.dtype == x.dtype
        assert y.min() >= -1 and y.max() <= 1


def test_bicubic_constant_and_identity() -> None:
    x = torch.full((2, 3, 32, 32), 0.3, dtype=torch.float64)
    y = bicubic_downsample(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, torch.full((2, 3, 8, 8), 0.3, dtype=torch.float64))
    z = torch.rand(1, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(bicubic_downsample(z, 1), z)


def test_bicubic_antialiases() -> None:
    """A one-pixel checkerboard is far above the new Nyquist limit: it must average out, not alias."""
    idx = torch.arange(32)
    checker = ((idx[:, None] + idx[None, :]) % 2).float() * 2 - 1  # [32, 32] in {-1, 1}
    y = bicubic_downsample(checker[None, None].expand(1, 3, 32, 32), 4)
    assert y.abs().max() < 0.05


def test_bsr_deterministic_per_seed(photos32: torch.Tensor) -> None:
    a = bsr_degrade(photos32, 4, generator=_gen(7))
    b = bsr_degrade(photos32, 4, generator=_gen(7))
    c = bsr_degrade(photos32, 4, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - c).abs().mean() > 0.01


def test_bsr_draws_per_image() -> None:
    """The same image repeated in a batch gets a different degradation each time, and the generator advances."""
    x = _images(32, 1).expand(6, 3, 32, 32)
    g = _gen(0)
    y = bsr_degrade(x, 4, generator=g)
    assert len({tuple(v.flatten().tolist()) for v in y}) == 6
    assert not torch.equal(y, bsr_degrade(x, 4, generator=g))


def test_bsr_output_is_8_bit(photos32: torch.Tensor) -> None:
    """The chain ends with a JPEG round trip, so values lie on the 8-bit grid, as the reference's uint8 output."""
    q = (bsr_degrade(photos32, 4, generator=_gen(0)) + 1) * 127.5
    assert (q - q.round()).abs().max() < 1e-3


@pytest.mark.parametrize("channels", [1, 3])
def test_bsr_differs_from_bicubic_but_stays_correlated(photos32: torch.Tensor, channels: int) -> None:
    x = photos32.mean(1, keepdim=True) if channels == 1 else photos32
    bic = bicubic_downsample(x, 4)
    y = bsr_degrade(x, 4, generator=_gen(0))
    p = psnr(y, bic)  # [B] dB
    # observed on photo crops: about 15-50 dB per image, mean near 30; bicubic vs bicubic would be inf
    assert p.min() > 12.0, p
    assert 20.0 < p.mean() < 42.0, p
    assert (y - bic).abs().mean() > 0.01
    yc = y.flatten(1) - y.flatten(1).mean(1, keepdim=True)
    bc = bic.flatten(1) - bic.flatten(1).mean(1, keepdim=True)
    corr = (yc * bc).sum(1) / (yc.norm(dim=1) * bc.norm(dim=1)).clamp_min(1e-12)  # [B] Pearson r
    assert corr.median() > 0.8, corr


def test_bsr_keeps_device_dtype_and_grad_free() -> None:
    x = (torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1).requires_grad_()
    y = bsr_degrade(x, 4, generator=_gen(0))
    assert y.dtype == torch.float64 and y.device == x.device and not y.requires_grad


def test_tiny_outputs() -> None:
    """Inputs of 4-16 px still give exactly H/f x W/f (the guards for tiny intermediates)."""
    for size in (4, 8, 16):
        y = bsr_degrade(torch.zeros(2, 3, size, size), 4, generator=_gen(0))
        assert y.shape == (2, 3, size // 4, size // 4)


@pytest.mark.parametrize(
    ("x", "factor", "match"),
    [
        (torch.zeros(3, 32, 32), 4, "expected images"),
        (torch.zeros(1, 3, 30, 32), 4, "not divisible"),
        (torch.zeros(1, 3, 32, 30), 4, "not divisible"),
        (torch.zeros(1, 3, 32, 32), 0, "factor must be"),
        (torch.full((1, 3, 32, 32), 255.0), 4, r"\[-1, 1\]"),
        (torch.full((1, 3, 32, 32), -2.0), 4, r"\[-1, 1\]"),
        (torch.full((1, 3, 32, 32), float("nan")), 4, "NaN"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 4, "floating-point"),
    ],
)
def test_bad_inputs(x: torch.Tensor, factor: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bicubic_downsample(x, factor)
    with pytest.raises(ValueError, match=match):
        bsr_degrade(x, factor, generator=_gen(0))


def test_bsr_bad_channels_and_generator() -> None:
    with pytest.raises(ValueError, match="1 or 3 channels"):
        bsr_degrade(torch.zeros(1, 2, 32, 32), 4, generator=_gen(0))
    with pytest.raises(ValueError, match="torch.Generator"):
        bsr_degrade(torch.zeros(1, 3, 32, 32), 4, generator=None)  # type: ignore[arg-type]


def test_slight_overshoot_is_accepted() -> None:
    x = torch.full((1, 3, 16, 16), 1.05)
    assert bicubic_downsample(x).max() <= 1.0
    assert bsr_degrade(x, 4, generator=_gen(0)).max() <= 1.0
