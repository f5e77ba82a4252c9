"""Linear multistep sampling of the probability-flow ODE (k-diffusion's `sample_lms`; Karras et al. 2022, eq. 4).

With d_k = (x_k - D(x_k, sigma_k)) / sigma_k, one step of order p integrates the Lagrange interpolant of the last
p derivatives (an Adams-Bashforth method on the non-uniform sigma grid):

    x_{i+1} = x_i + sum_{j<p} c_{ij} d_{i-j},   c_{ij} = int_{sigma_i}^{sigma_{i+1}} prod_{k<p, k!=j}
              (s - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k}) ds.

The order ramps up 1, 2, ..., `order` over the first steps. The integrand is a polynomial of degree p - 1, so
Gauss-Legendre quadrature with 8 nodes (exact up to degree 15) gives the coefficients to rounding error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..sigmas import sigma_batch, to_d
from .euler import SigmaDenoiserFn

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(8)


def lms_coefficient(order: int, sigmas: np.ndarray, i: int, j: int) -> float:
    """c_ij: the integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial of node sigmas[i - j]."""
    if order - 1 > i:
        raise ValueError(f"order {order} is too high for step {i}")
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    s = (b - a) / 2 * _NODES + (a + b) / 2  # nodes mapped from [-1, 1] to [a, b]
    basis = np.ones_like(s)
    for k in range(order):
        if k != j:
            basis *= (s - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((b - a) / 2 * np.dot(_WEIGHTS, basis))


@torch.no_grad()
def sample_lms(
    denoiser: SigmaDenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    order: int = 4,
) -> Tensor:
    """Run LMS of `order` from x = noise * sigmas[0] down the descending grid `sigmas` (ending in 0).

    Deterministic: `generator` is accepted for the common signature and unused. callback receives
    {"x", "i", "sigma", "denoised"} after every denoiser call.
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    sig = sigmas.detach().cpu().double().numpy()
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigma_batch(x, sigmas[i]))
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(cur, sig, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
    return x
