"""PLMS sampling (Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds").

PLMS keeps the DDIM transfer step (the "pseudo" part; Song et al. 2021, eq. 12 with eta = 0) and replaces
the single eps estimate by a linear multistep combination of past ones. With e_k = eps_theta(x_k, t_k)
(Liu et al. 2022, eq. 11-12, as the CompVis PLMSSampler implements them):

    step 1:     e' = (e_0 + eps_theta(x~, t_1)) / 2,  x~ = phi(x_0, e_0, t_0 -> t_1)     (pseudo improved Euler)
    step 2:     e' = (3 e_k - e_{k-1}) / 2                                               (Adams-Bashforth 2)
    step 3:     e' = (23 e_k - 16 e_{k-1} + 5 e_{k-2}) / 12                              (Adams-Bashforth 3)
    later:      e' = (55 e_k - 59 e_{k-1} + 37 e_{k-2} - 9 e_{k-3}) / 24                 (PLMS, eq. 12)
    x_{k+1} = phi(x_k, e', t_k -> t_{k+1}) = sqrt(a') x0(e') + sqrt(1 - a') e',
    x0(e') = (x_k - sqrt(1 - a) e') / sqrt(a)

where phi is the deterministic DDIM step (eq. 11 of Liu et al.). The history holds the raw e_k (never e'),
and the first step costs two network evaluations. The grid and float32 arithmetic are DDIM's (see ddim.py),
so that LDM's trajectories are reproduced; the recorded `denoised` is x0(e'), as the reference records it.
PLMS is deterministic: there is no eta.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..noise import randn_like
from ..parameterization import Denoiser, timesteps_like
from ..schedules import NoiseSchedule, _gather, ddim_timesteps
from .ddim import ddim_coefficients

# Adams-Bashforth weights of (e_k, e_{k-1}, ...) by how many past evaluations are available
_AB_WEIGHTS = {
    1: ((3.0, -1.0), 2.0),
    2: ((23.0, -16.0, 5.0), 12.0),
    3: ((55.0, -59.0, 37.0, -9.0), 24.0),
}


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser,
    x: Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    spacing: str = "uniform",
    timesteps: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    mask: Tensor | None = None,
    x0: Tensor | None = None,
) -> Tensor:
    """Run PLMS from x = x_T down the DDIM step grid and return the final sample.

    denoiser(x_t, t) -> x0_hat with t integer training steps ([B] int64); eps is recovered from it.
    `timesteps` (ascending training steps) overrides `steps`/`spacing`.
    `generator` is only used for the inpainting re-noising: where mask == 1 the known `x0` is kept,
    re-noised to the current step each iteration (as in sample_ddim).
    callback receives {"x": x_s, "i": step index, "t": t, "denoised": x0(e')} after every step.
    """
    if (mask is None) != (x0 is None):
        raise ValueError("inpainting needs both mask and x0")
    grid = ddim_timesteps(steps, schedule.num_timesteps, spacing) if timesteps is None else timesteps.long()
    if grid.ndim != 1 or grid.min() < 0 or grid.max() >= schedule.num_timesteps:
        raise ValueError(f"timesteps must be a 1-D grid inside [0, {schedule.num_timesteps})")
    a_all, a_prev_all, _ = ddim_coefficients(schedule, grid, 0.0)
    ac = schedule.alphas_cumprod_f32

    def eps_of(x_t: Tensor, t: Tensor) -> Tensor:
        a = _gather(ac, t, x_t)
        return (x_t - a.sqrt() * denoiser(x_t, t)) / (1 - a).sqrt()

    def transfer(x_t: Tensor, eps: Tensor, index: int) -> tuple[Tensor, Tensor]:
        # phi: the deterministic DDIM step from grid[index] to its predecessor; scalars float32 on x's device
        a = a_all[index].to(x_t)
        a_prev = a_prev_all[index].to(x_t)
        x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        return a_prev.sqrt() * x0_hat + (1.0 - a_prev).sqrt() * eps, x0_hat

    n = len(grid)
    history: list[Tensor] = []  # raw eps evaluations, newest last, at most 3 kept
    for i in range(n):
        index = n - 1 - i  # walk the grid from its top
        t = timesteps_like(x, int(grid[index]))
        if mask is not None:
            assert x0 is not None  # mask and x0 come together (checked above)
            noise = randn_like(x, generator)
            x = schedule.q_sample(x0, t, noise) * mask + (1 - mask) * x
        eps = eps_of(x, t)
        if not history:
            # pseudo improved Euler: a provisional DDIM step, then the slope at its end (the reference uses
            # the last grid step itself as "next" when there is only one step)
            x_next, _ = transfer(x, eps, index)
            t_next = timesteps_like(x, int(grid[max(index - 1, 0)]))
            eps_prime = (eps + eps_of(x_next, t_next)) / 2
        else:
            weights, denom = _AB_WEIGHTS[len(history)]
            eps_prime = weights[0] * eps
            for w, e in zip(weights[1:], reversed(history), strict=False):
                eps_prime = eps_prime + w * e
            eps_prime = eps_prime / denom
        x, x0_hat = transfer(x, eps_prime, index)
        history.append(eps)
        if len(history) > 3:
            history.pop(0)
        if callback is not None:
            callback({"x": x, "i": i, "t": int(grid[index]), "denoised": x0_hat})
    return x
