"""Ancestral Euler sampling in sigma space (k-diffusion's `sample_euler_ancestral`).

Each step from sigma to sigma' splits sigma' into a deterministic part and fresh noise,

    sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)),
    sigma_down = sqrt(sigma'^2 - sigma_up^2),

takes the Euler step of the probability-flow ODE (Karras et al. 2022, eq. 4) to sigma_down and adds
sigma_up s_noise z. eta = 1 matches the DDPM posterior variance (Ho et al. 2020, eq. 7) in sigma space; eta = 0
is plain Euler. No noise is added on the final step onto sigma = 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..noise import randn_like
from ..sigmas import sigma_batch, to_d
from .euler import SigmaDenoiserFn


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of one ancestral step from sigma_from to sigma_to."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: SigmaDenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Run ancestral Euler from x = noise * sigmas[0] down the descending grid `sigmas` (ending in 0).

    Fresh noise comes from `generator`. callback receives {"x", "i", "sigma", "denoised"} after every step's
    denoiser call.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma_batch(x, s))
        sigma_down, sigma_up = ancestral_step(s, s_next, eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        x = x + to_d(x, s, denoised) * (sigma_down - s)
        if s_next > 0 and sigma_up > 0:
            z = randn_like(x, generator)
            x = x + z * s_noise * sigma_up
    return x
