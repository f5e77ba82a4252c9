"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 2).

With d_i = (x_i - D(x_i, sigma_i)) / sigma_i (eq. 4) and h = sigma_{i+1} - sigma_i:

    x' = x_i + h d_i,   d' = (x' - D(x', sigma_{i+1})) / sigma_{i+1},   x_{i+1} = x_i + h (d_i + d') / 2,

falling back to the Euler step when sigma_{i+1} = 0 (Algorithm 2, line 9). Two denoiser calls per step except
the last. s_churn > 0 adds the stochastic churn of lines 4-6 (see `euler.churn`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..sigmas import sigma_batch, to_d
from .euler import SigmaDenoiserFn, churned_derivative


@torch.no_grad()
def sample_heun(
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
    """Run Heun from x = noise * sigmas[0] down the descending grid `sigmas` (ending in 0).

    denoiser(x, sigma) -> x0 with sigma a [B] float tensor. callback receives
    {"x", "i", "sigma", "sigma_hat", "denoised"} after the first denoiser call of every step.
    """
    n = len(sigmas) - 1
    churn_args = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    for i in range(n):
        x, sigma_hat, d = churned_derivative(denoiser, x, sigmas, i, churn_args, generator, callback)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt  # Euler step onto the clean sample
            continue
        x_2 = x + d * dt
        denoised_2 = denoiser(x_2, sigma_batch(x, sigmas[i + 1]))
        d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
        x = x + (d + d_2) / 2 * dt
    return x
