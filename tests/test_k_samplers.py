"""Sigma-space (k-diffusion style) samplers: closed forms, Gaussian-data convergence and diffusers parity."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from ldmkit.diffusion.parameterization import DiscreteDenoiser
from ldmkit.diffusion.samplers.ddim import sample_ddim
from ldmkit.diffusion.samplers.dpmpp_2m import sample_dpmpp_2m
from ldmkit.diffusion.samplers.dpmpp_2m_sde import sample_dpmpp_2m_sde
from ldmkit.diffusion.samplers.euler import sample_euler
from ldmkit.diffusion.samplers.euler_ancestral import sample_euler_ancestral
from ldmkit.diffusion.samplers.heun import sample_heun
from ldmkit.diffusion.samplers.lms import lms_coefficient, sample_lms
from ldmkit.diffusion.schedules import NoiseSchedule, ddim_timesteps
from ldmkit.diffusion.sigmas import (
    SigmaDenoiser,
    discrete_sigma_grid,
    discrete_sigmas,
    exponential_sigmas,
    karras_sigmas,
    polyexponential_sigmas,
    sigma_to_t,
    t_to_sigma,
)

# diffusers builds np.array(torch_tensor) in its set_timesteps, which numpy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD = NoiseSchedule.make("linear", 1000, 0.00085, 0.012)  # Stable Diffusion's "scaled_linear"
MU, S = 0.5, 0.3  # 1-D Gaussian data N(MU, S^2)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact D(x, sigma) = E[x0 | x] for x0 ~ N(MU, S^2): (S^2 x + sigma^2 MU) / (S^2 + sigma^2)."""
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return (S**2 * x + s2 * MU) / (S**2 + s2)


def exact_ode(x_T: torch.Tensor, sigma_T: float) -> torch.Tensor:
    """Probability-flow ODE solution at sigma = 0 for Gaussian data: x - MU scales as sqrt(S^2 + sigma^2)."""
    return MU + (x_T - MU) * S / math.sqrt(S**2 + sigma_T**2)


class TinyEpsNet(torch.nn.Module):
    """A fixed random conv net eps(x_t, t), smooth in (possibly fractional) t."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(16, 4, 3, 3, generator=g) * 0.15)
        self.w2 = torch.nn.Parameter(torch.randn(4, 16, 3, 3, generator=g) * 0.15)
        self.wt = torch.nn.Parameter(torch.randn(16, 2, generator=g))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0]) / 1000
        emb = torch.stack([torch.sin(3 * t), torch.cos(2 * t)], dim=1) @ self.wt.T  # [B, 16]
        h = torch.nn.functional.conv2d(x, self.w1, padding=1) + emb[:, :, None, None]
        return 0.9 * x + torch.nn.functional.conv2d(torch.tanh(h), self.w2, padding=1)


NET = TinyEpsNet()


def fractional_denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 from NET's eps at fractional steps t, alpha_bar from the log-sigma interpolated table."""
    a = (1 / (1 + t_to_sigma(t, discrete_sigmas(SD)) ** 2)).reshape(-1, 1, 1, 1)
    return (x_t - (1 - a).sqrt() * NET(x_t, t)) / a.sqrt()


# ---------------------------------------------------------------- closed forms


def test_sigma_grids():
    k = karras_sigmas(10, 0.03, 14.6, rho=7.0)
    e = exponential_sigmas(10, 0.03, 14.6)
    p = polyexponential_sigmas(10, 0.03, 14.6, rho=1.0)
    for g in (k, e, p):
        assert g.shape == (11,) and g[-1] == 0
        assert torch.allclose(g[[0, -2]], torch.tensor([14.6, 0.03]), rtol=1e-5)
        assert torch.all(g[1:] < g[:-1])
    assert torch.allclose(e, p, rtol=1e-5)
    # Karras eq. 5: sigma^(1/rho) is linear in i
    r = k[:-1] ** (1 / 7)
    assert torch.allclose(r[1:] - r[:-1], (r[1] - r[0]).expand(9), atol=1e-5)
    # exponential: constant ratio
    assert torch.allclose(e[1:-1] / e[:-2], (e[1] / e[0]).expand(9), rtol=1e-5)


def test_discrete_sigmas_and_t_roundtrip():
    sig = discrete_sigmas(SD)
    a = SD.alphas_cumprod_f32
    assert sig.dtype == torch.float32 and torch.allclose(sig, ((1 - a) / a).sqrt())
    assert torch.all(sig[1:] > sig[:-1])
    t = torch.tensor([0.0, 1.0, 17.25, 500.5, 998.75, 999.0])
    assert torch.allclose(sigma_to_t(t_to_sigma(t, sig), sig), t, atol=1e-3)
    ti = torch.arange(1000)
    assert torch.equal(sigma_to_t(sig[ti], sig, quantize=True), ti)
    # k-diffusion's / A1111's default grid: log-sigma interpolation of linspace(T - 1, 0, n)
    g = discrete_sigma_grid(SD, 10, "linspace", interpolation="log")
    assert torch.allclose(g[[0, -2, -1]], torch.stack([sig[999], sig[0], torch.tensor(0.0)]), rtol=1e-5)
    assert torch.allclose(g[:-1], t_to_sigma(torch.linspace(999, 0, 10), sig), rtol=1e-6)
    # outside the table: clamped
    assert sigma_to_t(torch.tensor([1e-4, 1e3]), sig).tolist() == [0.0, 999.0]


def test_lms_coefficients_are_adams_bashforth_on_a_uniform_grid():
    sig = np.linspace(10.0, 0.0, 11)
    h = sig[1] - sig[0]
    ab4 = np.array([55, -59, 37, -9]) / 24 * h
    assert np.allclose([lms_coefficient(4, sig, 5, j) for j in range(4)], ab4, atol=1e-12)
    assert np.allclose([lms_coefficient(2, sig, 5, j) for j in range(2)], np.array([1.5, -0.5]) * h, atol=1e-12)


def test_sigma_denoiser_on_grid_is_the_discrete_denoiser():
    den = DiscreteDenoiser(NET, SD, "eps")
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([981, 41])
    sig = discrete_sigmas(SD)[t]
    x = x_t * (1 + sig**2).sqrt().reshape(-1, 1, 1, 1)
    out = SigmaDenoiser(den, SD)(x, sig)
    assert torch.allclose(out, den(x_t, t), atol=1e-4)
    assert torch.allclose(SigmaDenoiser(den, SD, keep="x0")(x, sig), den(x_t, t), atol=1e-4)


def test_euler_on_the_ddim_grid_is_ddim():
    """DDIM (eta = 0) is the Euler step of the probability-flow ODE in x / sqrt(a) (Song et al. 2021, eq. 14)."""
    den = DiscreteDenoiser(NET, SD, "eps")
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    grid = ddim_timesteps(10, 1000)
    ref = sample_ddim(den, x_T, SD, timesteps=grid)
    sig = discrete_sigmas(SD)
    sigmas = torch.cat([sig[grid.flip(0)], sig[:1]])  # DDIM's last step lands on alpha_bar_0
    out = sample_euler(SigmaDenoiser(den, SD), x_T * (1 + sigmas[0] ** 2).sqrt(), sigmas)
    assert (out / (1 + sigmas[-1] ** 2).sqrt() - ref).abs().max() < 1e-4


# ---------------------------------------------------------------- Gaussian data


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun, sample_dpmpp_2m, sample_lms])
def test_gaussian_moments_at_50_steps(sampler):
    sigmas = karras_sigmas(50, 0.01, 10.0)
    x_T = torch.randn(4000, 1, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    out = sampler(gaussian_denoiser, x_T, sigmas)
    assert abs(out.mean().item() - MU) < 0.05 and abs(out.std().item() - S) < 0.05
    assert (out - exact_ode(x_T, float(sigmas[0]))).abs().max() < 0.05


def test_higher_order_beats_euler_at_20_steps():
    sigmas = karras_sigmas(20, 0.01, 10.0)
    x_T = torch.randn(4000, 1, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    ref = exact_ode(x_T, float(sigmas[0]))
    err = {
        f.__name__: (f(gaussian_denoiser, x_T, sigmas) - ref).abs().max().item()
        for f in (sample_euler, sample_heun, sample_dpmpp_2m, sample_lms)
    }
    assert err["sample_heun"] < err["sample_euler"] and err["sample_dpmpp_2m"] < err["sample_euler"], err
    assert err["sample_lms"] < err["sample_euler"], err


@pytest.mark.parametrize("sampler", [sample_euler_ancestral, sample_dpmpp_2m_sde])
def test_ancestral_samplers(sampler):
    sigmas = karras_sigmas(50, 0.01, 10.0)
    x_T = torch.randn(4000, 1, generator=torch.Generator().manual_seed(5)) * sigmas[0]
    a = sampler(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(7))
    b = sampler(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(7))
    c = sampler(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert abs(a.mean().item() - MU) < 0.05 and abs(a.std().item() - S) < 0.05
    # eta = 0: the deterministic samplers
    det = sample_euler if sampler is sample_euler_ancestral else sample_dpmpp_2m
    assert torch.allclose(
        sampler(gaussian_denoiser, x_T, sigmas, eta=0.0), det(gaussian_denoiser, x_T, sigmas), atol=1e-5
    )


def test_euler_churn_follows_the_generator():
    sigmas = karras_sigmas(30, 0.01, 10.0)
    x_T = torch.randn(4000, 1, generator=torch.Generator().manual_seed(6)) * sigmas[0]
    kw = dict(s_churn=10.0, s_tmin=0.05, s_tmax=5.0)
    a = sample_euler(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(1), **kw)
    b = sample_euler(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b) and not torch.allclose(a, sample_euler(gaussian_denoiser, x_T, sigmas))
    assert abs(a.mean().item() - MU) < 0.05 and abs(a.std().item() - S) < 0.05


def test_callback_sees_every_step():
    seen = []
    sigmas = karras_sigmas(5, 0.01, 10.0)
    sample_heun(gaussian_denoiser, torch.zeros(3, 1), sigmas, callback=lambda d: seen.append(d["i"]))
    assert seen == list(range(5))


# ---------------------------------------------------------------- diffusers parity

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (pip install diffusers)")
SD_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    timestep_spacing="leading",
    steps_offset=1,
)


def _run_diffusers(
    scheduler, x_T: torch.Tensor, steps: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(initial x, final sample, sigmas) of the standard diffusers denoising loop with NET as eps model."""
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    x_init = x.clone()
    for t in scheduler.timesteps:
        eps = NET(scheduler.scale_model_input(x, t), t)
        kw = {} if generator is None else {"generator": generator}  # Heun's and LMS's step() take none
        x = scheduler.step(eps, t, x, **kw).prev_sample
    return x_init, x, scheduler.sigmas.clone()


def _diffusers_scheduler(name: str, karras: bool):
    import diffusers

    if name == "lms" and importlib.util.find_spec("scipy") is None:
        pytest.skip("diffusers' LMSDiscreteScheduler needs scipy (integrate.quad), which is not installed")
    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(
            **SD_CONFIG, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras
        )
    cls = {"euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler"}[name]
    return getattr(diffusers, cls)(**SD_CONFIG, use_karras_sigmas=karras)


OURS = {"euler": sample_euler, "heun": sample_heun, "lms": sample_lms, "dpmpp_2m": sample_dpmpp_2m}


@needs_diffusers
@pytest.mark.parametrize("karras", [False, True], ids=["grid", "karras"])
@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpmpp_2m"])
def test_diffusers_parity(name, karras):
    sched = _diffusers_scheduler(name, karras)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    x_init, ref, sigmas = _run_diffusers(sched, x_T, 20)
    if name == "heun":
        sigmas = torch.cat([sigmas[0::2], sigmas[-1:]])  # diffusers repeats each inner sigma for the 2nd stage
    if name == "dpmpp_2m":
        # diffusers integrates in VP space: x_t = x / sqrt(1 + sigma^2); the model sees integer (rounded) steps
        x = x_init * (1 + sigmas[0] ** 2).sqrt()
        den = SigmaDenoiser(DiscreteDenoiser(NET, SD, "eps"), SD)
    elif karras:
        # the Karras grid is off the trained steps: diffusers hands the model the fractional step
        x = x_init
        den = SigmaDenoiser(fractional_denoiser, SD, quantize=False)
    else:
        x = x_init
        den = SigmaDenoiser(DiscreteDenoiser(NET, SD, "eps"), SD)
    out = OURS[name](den, x, sigmas)
    err = (out - ref).abs().max().item()
    print(f"{name} karras={karras}: max |ours - diffusers| = {err:.3g}")
    assert err < 1e-4


@needs_diffusers
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_discrete_grid_matches_diffusers(spacing):
    import diffusers

    cfg = {**SD_CONFIG, "timestep_spacing": spacing}
    sched = diffusers.EulerDiscreteScheduler(**cfg)
    for n in (7, 20, 50):
        sched.set_timesteps(n)
        ours = discrete_sigma_grid(SD, n, spacing, steps_offset=cfg["steps_offset"])
        # diffusers accumulates alpha_bar in float32, the CompVis table (ours) in float64: ~3e-6 relative apart
        assert torch.allclose(ours, sched.sigmas, rtol=1e-5, atol=0), (spacing, n)


@needs_diffusers
@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde"])
def test_diffusers_parity_stochastic(name):
    """Same generator, same draws: both draw one [B, ...] normal per step, in the same order."""
    import diffusers

    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    den = SigmaDenoiser(DiscreteDenoiser(NET, SD, "eps"), SD)
    if name == "euler_ancestral":
        sched = diffusers.EulerAncestralDiscreteScheduler(**SD_CONFIG)
        x_init, ref, sigmas = _run_diffusers(sched, x_T, 20, torch.Generator().manual_seed(12))
        out = sample_euler_ancestral(den, x_init, sigmas, generator=torch.Generator().manual_seed(12))
    else:
        sched = diffusers.DPMSolverMultistepScheduler(**SD_CONFIG, algorithm_type="sde-dpmsolver++", solver_order=2)
        x_init, ref, sigmas = _run_diffusers(sched, x_T, 20, torch.Generator().manual_seed(12))
        x = x_init * (1 + sigmas[0] ** 2).sqrt()
        out = sample_dpmpp_2m_sde(den, x, sigmas, generator=torch.Generator().manual_seed(12))
    err = (out - ref).abs().max().item()
    print(f"{name}: max |ours - diffusers| = {err:.3g}")
    assert err < 1e-4
