"""DPM-Solver++(2M) (Lu et al. 2022b, "DPM-Solver++", Algorithm 2), in sigma space as k-diffusion writes it.

With lambda = -log sigma (the half log-SNR of the VE view; alpha = 1), h_i = lambda_{i+1} - lambda_i and
r_i = h_{i-1} / h_i, the multistep data-prediction update is

    D_i = (1 + 1 / (2 r_i)) x0_i - 1 / (2 r_i) x0_{i-1},
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - (e^{-h_i} - 1) D_i,

the exponential-integrator form of eq. 10 with a first-order backward difference of the denoised predictions.
The first step, and the final step onto sigma = 0, are first order (D_i = x0_i: DPM-Solver++(1), i.e. DDIM).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..sigmas import sigma_batch
from .euler import SigmaDenoiserFn


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: SigmaDenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Tensor:
    """Run DPM-Solver++(2M) from x = noise * sigmas[0] down the descending grid `sigmas` (ending in 0).

    Deterministic: `generator` is accepted for the common signature and unused. callback receives
    {"x", "i", "sigma", "denoised"} after every denoiser call.
    """
    old_denoised: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigma_batch(x, sigmas[i]))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised  # lambda_{i+1} = +inf: the first-order step lands on x0
        else:
            lam, lam_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = lam_next - lam
            d = denoised
            if old_denoised is not None:
                r = (lam - (-sigmas[i - 1].log())) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * d
        old_denoised = denoised
    return x
