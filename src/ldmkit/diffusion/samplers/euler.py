"""Euler sampling of the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 2, first order).

dx/dsigma = (x - D(x, sigma)) / sigma (eq. 4); one step from sigma_i to sigma_{i+1}:

    x <- x + (sigma_{i+1} - sigma_i) (x - D(x, sigma_i)) / sigma_i.

With s_churn > 0 the "churn" of Algorithm 2 is applied first: for sigma_i in [s_tmin, s_tmax],
gamma = min(s_churn / N, sqrt(2) - 1), sigma_hat = sigma_i (1 + gamma) and
x <- x + sqrt(sigma_hat^2 - sigma_i^2) s_noise z, then the Euler step starts from sigma_hat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..noise import randn_like
from ..sigmas import sigma_batch, to_d

SigmaDenoiserFn = Callable[[Tensor, Tensor], Tensor]


def churn(
    x: Tensor,
    sigma: float,
    n: int,
    *,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, float]:
    """Karras et al. (2022) Algorithm 2, lines 4-6: raise the noise level from sigma to sigma_hat."""
    gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    z = randn_like(x, generator) * s_noise
    return x + z * (sigma_hat**2 - sigma**2) ** 0.5, sigma_hat


def churned_derivative(
    denoiser: SigmaDenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    i: int,
    churn_args: dict[str, float],
    generator: torch.Generator | None,
    callback: Callable[[dict[str, Any]], None] | None,
) -> tuple[Tensor, float, Tensor]:
    """Algorithm 2, lines 4-7, shared by Euler and Heun: churn to sigma_hat, denoise, d = (x - D) / sigma_hat.

    Returns (x at sigma_hat, sigma_hat, d) and reports the step to `callback`.
    """
    x, sigma_hat = churn(x, float(sigmas[i]), len(sigmas) - 1, generator=generator, **churn_args)
    denoised = denoiser(x, sigma_batch(x, sigma_hat))
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
    return x, sigma_hat, to_d(x, sigma_hat, denoised)


@torch.no_grad()
def sample_euler(
    denoiser: SigmaDenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Run Euler from x = noise * sigmas[0] down the descending grid `sigmas` (ending in 0).

    denoiser(x, sigma) -> x0 with sigma a [B] float tensor. callback receives
    {"x", "i", "sigma", "sigma_hat", "denoised"} after every denoiser call.
    """
    n = len(sigmas) - 1
    churn_args = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    for i in range(n):
        x, sigma_hat, d = churned_derivative(denoiser, x, sigmas, i, churn_args, generator, callback)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x
