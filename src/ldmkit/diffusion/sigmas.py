"""The sigma-space view of a discrete VP schedule (Karras et al. 2022, "Elucidating the Design Space ...").

A VP sample x_t = sqrt(a) x_0 + sqrt(1 - a) eps (a = alpha_bar_t) rescaled by 1 / sqrt(a) is the
variance-exploding sample

    x = x_t / sqrt(a) = x_0 + sigma eps,        sigma_t = sqrt((1 - a_t) / a_t),

so x_t = x / sqrt(1 + sigma^2). The k-diffusion samplers (euler, heun, lms, dpmpp_*) work on x with a denoiser
D(x, sigma) -> x0 and a descending grid of sigmas ending in 0. This module builds those grids and the
`SigmaDenoiser` adapter from our `denoiser(x_t, t) -> x0_hat` (integer training steps t) to D(x, sigma).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .parameterization import Denoiser
from .schedules import NoiseSchedule

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def discrete_sigmas(schedule: NoiseSchedule) -> Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) for t = 0..T-1, ascending, from the float32 alpha_bar table ([T] float32)."""
    a = schedule.alphas_cumprod_f32
    return ((1 - a) / a) ** 0.5


def append_zero(sigmas: Tensor) -> Tensor:
    """The grid with a final sigma = 0 appended (the last step lands on the clean sample)."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5, with a final 0: n + 1 values.

    sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0..n-1.
    """
    _check_range(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n sigmas evenly spaced in log sigma from sigma_max down to sigma_min, with a final 0."""
    _check_range(n, sigma_min, sigma_max)
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """Log sigma = log sigma_min + r^rho (log sigma_max - log sigma_min), r from 1 to 0; a final 0 appended.

    rho = 1 is `exponential_sigmas`; rho > 1 spends more steps at low noise.
    """
    _check_range(n, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n) ** rho
    lmin, lmax = math.log(sigma_min), math.log(sigma_max)
    return append_zero(torch.exp(ramp * (lmax - lmin) + lmin))


def discrete_sigma_grid(
    schedule: NoiseSchedule,
    n: int,
    spacing: str = "linspace",
    *,
    steps_offset: int = 0,
    interpolation: str = "linear",
) -> Tensor:
    """The n-step grid of a discrete model as diffusers' Euler/Heun/LMS schedulers build it, plus a final 0.

    Training steps (descending), with T the number of training steps:
      "linspace": linspace(0, T - 1, n) (non-integer in general),
      "leading":  arange(n) * (T // n) + steps_offset  (Stable Diffusion's config: steps_offset = 1),
      "trailing": round(arange(T, 0, -T / n)) - 1.
    Non-integer steps are mapped to sigma by linear interpolation of the sigma table ("linear", diffusers) or of
    log sigma ("log", k-diffusion's `DiscreteSchedule.t_to_sigma`, which A1111 uses for its default grid).
    Returns n + 1 float32 sigmas, descending.
    """
    T = schedule.num_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"n must be between 1 and {T}, got {n}")
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        t = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32) + steps_offset
    elif spacing == "trailing":
        t = np.arange(T, 0, -T / n).round().astype(np.float32) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")
    table = discrete_sigmas(schedule)
    if interpolation == "linear":
        sig = np.interp(t, np.arange(T), table.numpy())
        return append_zero(torch.from_numpy(np.asarray(sig)).float())
    if interpolation == "log":
        return append_zero(t_to_sigma(torch.from_numpy(t.astype(np.float32)), table))
    raise ValueError(f"unknown interpolation {interpolation!r}; choose 'linear' or 'log'")


def sigma_to_t(sigma: Tensor, sigmas: Tensor, quantize: bool = False) -> Tensor:
    """Continuous training step of each sigma by linear interpolation in log sigma (k-diffusion's
    `DiscreteSchedule.sigma_to_t`); `sigmas` is the ascending table of `discrete_sigmas`.

    Sigmas outside the table are clamped to its ends (t = 0 or T - 1). quantize=True returns the nearest trained
    step in log sigma (int64) instead.
    """
    log_sigmas = sigmas.to(sigma.device).float().log()
    log_sigma = sigma.float().log()
    dists = log_sigma - log_sigmas[:, None]  # [T, N]
    if quantize:
        return dists.abs().argmin(dim=0).view(sigma.shape)
    # last table entry with log_sigmas <= log_sigma, kept so that [low, low + 1] is a valid bracket
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    t = (1 - w) * low + w * high
    return t.view(sigma.shape)


def t_to_sigma(t: Tensor, sigmas: Tensor) -> Tensor:
    """Sigma at continuous training steps t by linear interpolation of log sigma (inverse of `sigma_to_t`)."""
    log_sigmas = sigmas.to(t.device).float().log()
    t = t.float()
    low, high = t.floor().long(), t.ceil().long()
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


class SigmaDenoiser:
    """Turns our `denoiser(x_t, t) -> x0_hat` (VP space, training steps t) into k-diffusion's `D(x, sigma) -> x0`.

    x_t = x / sqrt(1 + sigma^2) = x sqrt(a) and t = sigma_to_t(sigma). The model is only defined on the integer
    steps it was trained on, so by default (quantize=True) t is the nearest trained step in log sigma; with
    quantize=False the fractional t of the log-sigma interpolation is passed on as a float tensor, which only a
    denoiser that accepts non-integer steps can take (diffusers hands its models such t for Karras grids).

    When sigma is off the trained grid, the denoiser's output is read at the step it was evaluated at:
    keep="eps" (default, k-diffusion's `DiscreteEpsDDPMDenoiser`) recovers the noise prediction
    eps = (x_t - sqrt(a_t) x0_hat) / sqrt(1 - a_t) with a_t the schedule's alpha_bar at t, and returns
    D = x - sigma eps, exact for eps-prediction networks; keep="x0" returns x0_hat unchanged. On the trained
    grid the two agree.
    """

    def __init__(self, denoiser: Denoiser, schedule: NoiseSchedule, *, quantize: bool = True, keep: str = "eps"):
        if keep not in ("eps", "x0"):
            raise ValueError(f"keep must be 'eps' or 'x0', got {keep!r}")
        self.denoiser = denoiser
        self.schedule = schedule
        self.quantize = quantize
        self.keep = keep
        self.sigmas = discrete_sigmas(schedule)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return sigma_to_t(sigma, self.sigmas, quantize=self.quantize)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return t_to_sigma(t, self.sigmas)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        shape = (-1, *([1] * (x.ndim - 1)))
        sigma = sigma.to(device=x.device, dtype=x.dtype).expand(x.shape[0])
        x_t = x / (1 + sigma.reshape(shape) ** 2) ** 0.5
        if bool((sigma == sigma[0]).all()):  # the usual case: one sigma per step, look it up once
            t = self.sigma_to_t(sigma[:1]).expand(sigma.shape[0])
        else:
            t = self.sigma_to_t(sigma)
        x0_hat = self.denoiser(x_t, t)
        if self.keep == "x0":
            return x0_hat
        if self.quantize:
            a = self.schedule.alphas_cumprod_f32.to(x.device)[t]
        else:
            a = 1 / (1 + self.t_to_sigma(t) ** 2)
        a = a.to(x.dtype).reshape(shape)
        eps = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
        return x - sigma.reshape(shape) * eps


def to_d(x: Tensor, sigma: Tensor | float, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def sigma_batch(x: Tensor, sigma: Tensor | float) -> Tensor:
    """A [B] tensor filled with one sigma, in x's dtype and device."""
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
