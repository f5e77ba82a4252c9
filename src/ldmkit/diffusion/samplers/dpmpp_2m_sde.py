"""DPM-Solver++(2M) SDE (Lu et al. 2022b, sec. 5 / App. B, SDE variant; k-diffusion's `sample_dpmpp_2m_sde`,
midpoint form).

With lambda = -log sigma, h = lambda_{i+1} - lambda_i, r = h_{i-1} / h and eta_h = eta h, a step of the
data-prediction SDE solver is

    x_{i+1} = (sigma_{i+1} / sigma_i) e^{-eta_h} x_i + (1 - e^{-h - eta_h}) x0_i
              + (1 - e^{-h - eta_h}) / (2 r) (x0_i - x0_{i-1})                      (second order, midpoint)
              + sigma_{i+1} sqrt(1 - e^{-2 eta_h}) s_noise z,

first order on the first step. eta = 0 gives the deterministic DPM-Solver++(2M) ODE solver (with its
second-order correction on every step but the final one); eta = 1 the SDE of the paper. The final step onto
sigma = 0 returns the denoised prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..noise import randn_like
from ..sigmas import sigma_batch
from .euler import SigmaDenoiserFn


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: SigmaDenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Run DPM-Solver++(2M) SDE from x = noise * sigmas[0] down the descending grid `sigmas` (ending in 0).

    Fresh noise comes from `generator` (k-diffusion defaults to a Brownian tree; plain Gaussian draws per step
    are the same SDE). callback receives {"x", "i", "sigma", "denoised"} after every denoiser call.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    old_denoised: Tensor | None = None
    h_last: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigma_batch(x, sigmas[i]))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
            h = None
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            eta_h = eta * h
            phi = -torch.expm1(-h - eta_h)  # 1 - e^{-h - eta_h}
            x = (sigmas[i + 1] / sigmas[i]) * torch.exp(-eta_h) * x + phi * denoised
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta > 0:
                z = randn_like(x, generator)
                x = x + z * sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x
