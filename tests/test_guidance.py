"""Classifier-free guidance and guidance rescale (Lin et al. 2024, eqs. 15-17) on a denoiser with known output."""

import pytest
import torch

from ldmkit.diffusion import guided_denoiser
from ldmkit.diffusion.guidance import rescale_guidance


def _denoiser(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # conditional branch: a scaled, shifted copy of x; unconditional branch (label -1): x itself
    lab = cond["labels"].float().view(-1, 1, 1, 1)
    return torch.where(lab >= 0, 0.5 * x + 0.1 * lab, x)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.full((3,), 10)
    return x, t, {"labels": torch.tensor([0, 1, 2])}, {"labels": torch.full((3,), -1)}


def test_guidance_mixes_uncond_and_cond() -> None:
    x, t, cond, uncond = _inputs()
    d_c, d_u = _denoiser(x, t, cond), _denoiser(x, t, uncond)
    out = guided_denoiser(_denoiser, cond, uncond, 4.0)(x, t)
    torch.testing.assert_close(out, d_u + 4.0 * (d_c - d_u))
    # scale 1 is the plain conditional denoiser
    torch.testing.assert_close(guided_denoiser(_denoiser, cond, uncond, 1.0)(x, t), d_c)


def test_guidance_rescale_full_matches_conditional_std() -> None:
    x, t, cond, uncond = _inputs()
    d_c = _denoiser(x, t, cond)
    plain = guided_denoiser(_denoiser, cond, uncond, 7.5)(x, t)
    full = guided_denoiser(_denoiser, cond, uncond, 7.5, rescale=1.0)(x, t)
    # phi = 1: every sample has the std of its conditional prediction, and is a positive multiple of x_cfg
    torch.testing.assert_close(full.flatten(1).std(1), d_c.flatten(1).std(1))
    ratio = full.flatten(1) / plain.flatten(1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    assert bool((ratio > 0).all())
    # the plain guided prediction is inflated (std ratio > 1), which is what the rescale undoes
    assert bool((plain.flatten(1).std(1) > 1.5 * d_c.flatten(1).std(1)).all())
    # phi = 0.7 is the linear blend of the two
    mid = guided_denoiser(_denoiser, cond, uncond, 7.5, rescale=0.7)(x, t)
    torch.testing.assert_close(mid, 0.7 * full + 0.3 * plain)
    # phi = 0 is plain guidance
    torch.testing.assert_close(guided_denoiser(_denoiser, cond, uncond, 7.5, rescale=0.0)(x, t), plain)


def test_rescale_is_per_sample() -> None:
    x_pos = torch.stack([torch.ones(2, 3, 3), 3 * torch.ones(2, 3, 3)])
    x_pos[:, 0, 0, 0] = 0.0
    x_cfg = 5 * x_pos
    out = rescale_guidance(x_cfg, x_pos, 1.0)
    torch.testing.assert_close(out, x_pos)


@pytest.mark.parametrize("phi", [-0.1, 1.5])
def test_rescale_out_of_range_is_refused(phi: float) -> None:
    x, t, cond, uncond = _inputs()
    with pytest.raises(ValueError, match="guidance rescale must be in"):
        guided_denoiser(_denoiser, cond, uncond, 3.0, rescale=phi)
