"""PLMS against the CompVis PLMSSampler fixtures; DDPM ancestral sampling and DDIM inversion on exact denoisers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from ldmkit.diffusion import DiscreteDenoiser, NoiseSchedule, guided_denoiser, sample_ddim
from ldmkit.diffusion.samplers.ddim_inversion import invert_ddim
from ldmkit.diffusion.samplers.ddpm import ddpm_coefficients, sample_ddpm
from ldmkit.diffusion.samplers.plms import sample_plms
from test_ddim_parity import _unet

pytestmark = pytest.mark.reference  # reads tests/fixtures/reference (conftest.reference_dir)

SCHEDULE = NoiseSchedule.make("linear", 1000, 0.00085, 0.012)


@pytest.mark.parametrize("run,scale", [("plms20", 1.0), ("plms20_cfg7.5", 7.5)])
def test_plms_matches_reference_trajectory(reference_dir, run, scale):
    fx = {k: v.clone() for k, v in load_file(reference_dir / "parity" / "samplers_eps.safetensors").items()}
    denoiser = DiscreteDenoiser(_unet(reference_dir, "unet_sd1_conv"), SCHEDULE, "eps")
    fn = guided_denoiser(denoiser, {"context": fx["input.context"]}, {"context": fx["input.uncond_context"]}, scale)
    xs, x0s, ts = [fx["input.x_T"]], [fx["input.x_T"]], []

    def record(info):
        xs.append(info["x"])
        x0s.append(info["denoised"])
        ts.append(info["t"])

    out = sample_plms(fn, fx["input.x_T"], SCHEDULE, steps=20, callback=record)
    assert ts == list(range(951, 0, -50))
    assert (out - fx[f"{run}.samples"]).abs().max().item() <= 1e-3
    assert (torch.stack(xs) - fx[f"{run}.x_inter"]).abs().max().item() <= 1e-3
    assert (torch.stack(x0s) - fx[f"{run}.pred_x0"]).abs().max().item() <= 1e-3


def gaussian_denoiser(mu, s):
    """The exact x0-denoiser of data N(mu, s^2): E[x0 | x_t] = mu + s^2 sqrt(a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)."""
    ac = SCHEDULE.alphas_cumprod_f32

    def fn(x, t):
        a = ac[t].to(x).view(-1, *([1] * (x.ndim - 1)))
        return mu + s**2 * a.sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    return fn


def _toy_denoiser(x, t):
    return torch.tanh(x) * (1 - t.view(-1, 1, 1, 1) / 2000)


def test_ddpm_follows_generator_and_plms_is_deterministic():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    grid = torch.arange(0, 1000, 37)  # a respaced sub-chain keeps this quick
    a = sample_ddpm(_toy_denoiser, x, SCHEDULE, timesteps=grid, generator=torch.Generator().manual_seed(5))
    b = sample_ddpm(_toy_denoiser, x, SCHEDULE, timesteps=grid, generator=torch.Generator().manual_seed(5))
    c = sample_ddpm(_toy_denoiser, x, SCHEDULE, timesteps=grid, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    p1 = sample_plms(_toy_denoiser, x, SCHEDULE, steps=7)
    p2 = sample_plms(_toy_denoiser, x, SCHEDULE, steps=7)
    assert torch.equal(p1, p2)


def test_ddpm_recovers_a_point_mass():
    c = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    x = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    ts = []
    out = sample_ddpm(lambda x, t: c.expand_as(x), x, SCHEDULE, generator=torch.Generator().manual_seed(1),
                      callback=lambda info: ts.append(info["t"]))
    assert ts == list(range(999, -1, -1))
    # the last step (t = 0) returns the posterior mean, which is c itself: no noise added
    assert (out - c).abs().max().item() < 1e-5


def test_plms_recovers_a_point_mass():
    c = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    x = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    out = sample_plms(lambda x, t: c.expand_as(x), x, SCHEDULE, steps=25)
    # like DDIM, the last step stops at alpha_bar_0 = 0.99915, leaving sqrt(1 - a) of the initial noise
    assert (out - c).abs().max().item() < 0.05 * x.abs().max().item() + 1e-6


def test_ddpm_coefficients_are_the_reference_buffers_and_respace_consistently():
    buf = SCHEDULE.buffers()
    c1, c2, log_var = ddpm_coefficients(SCHEDULE, torch.arange(1000))
    assert torch.equal(c1, buf["posterior_mean_coef1"])
    assert torch.equal(c2, buf["posterior_mean_coef2"])
    assert torch.equal(log_var, buf["posterior_log_variance_clipped"])
    # a gapped grid: 5 -> alpha_bar = 1 returns x0_hat (c1 = 1, c2 = 0); 9 -> 5 uses beta = 1 - a_9 / a_5
    c1, c2, log_var = ddpm_coefficients(SCHEDULE, torch.tensor([5, 9]))
    ac = SCHEDULE.alphas_cumprod
    assert c1[0].item() == pytest.approx(1.0) and c2[0].item() == pytest.approx(0.0, abs=1e-7)
    beta = 1 - ac[9] / ac[5]
    assert c1[1].item() == pytest.approx((beta * ac[5].sqrt() / (1 - ac[9])).item(), rel=1e-6)
    assert log_var[1].item() == pytest.approx((beta * (1 - ac[5]) / (1 - ac[9])).log().item(), rel=1e-6)


def test_ddpm_samples_a_gaussian():
    mu, s = 0.7, 1.3
    x = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0))
    out = sample_ddpm(gaussian_denoiser(mu, s), x, SCHEDULE, generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - mu) < 0.05
    assert abs(out.std().item() - s) < 0.05


def test_ddim_inversion_round_trip_on_a_gaussian():
    mu, s = 0.7, 1.3
    fn = gaussian_denoiser(mu, s)
    x0 = mu + s * torch.randn(256, 1, generator=torch.Generator().manual_seed(2))
    x_T = invert_ddim(fn, x0, SCHEDULE, steps=50, fixed_point_iters=2)
    assert (x_T - x0).abs().max() > 0.1  # it did move
    back = sample_ddim(fn, x_T, SCHEDULE, steps=50, eta=0.0)
    assert (back - x0).abs().max().item() < 1e-2
    # the plain explicit form (one call per step) is first order: close on unit-Gaussian data
    fn01 = gaussian_denoiser(0.0, 1.0)
    x0 = torch.randn(256, 1, generator=torch.Generator().manual_seed(3))
    back = sample_ddim(fn01, invert_ddim(fn01, x0, SCHEDULE, steps=50), SCHEDULE, steps=50)
    assert (back - x0).abs().max().item() < 1e-2


@settings(max_examples=15, deadline=None)
@given(
    mu=st.floats(-2.0, 2.0),
    s=st.floats(0.3, 2.0),
    z=st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=8),
)
def test_ddim_inversion_then_sampling_returns_the_input(mu, s, z):
    fn = gaussian_denoiser(mu, s)
    x0 = mu + s * torch.tensor(z, dtype=torch.float32).view(-1, 1)
    x_T = invert_ddim(fn, x0, SCHEDULE, steps=50, fixed_point_iters=3)
    back = sample_ddim(fn, x_T, SCHEDULE, steps=50)
    assert (back - x0).abs().max().item() < 1e-2
