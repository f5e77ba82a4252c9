"""Deterministic DDIM inversion: x_0 -> x_T along the eta = 0 DDIM path (Song, Meng & Ermon 2021).

DDIM with eta = 0 is the Euler discretisation of an ODE (Song et al. 2021, eq. 13-14), so it can be run
backwards. Going up the grid from step s (alpha_bar a') to the next step t (alpha_bar a):

    eps_hat = eps_theta(x_s, t)                                   (evaluated at the step being entered)
    x_t     = sqrt(a) (x_s - sqrt(1 - a') eps_hat) / sqrt(a') + sqrt(1 - a) eps_hat

This is the form of Mokady et al. 2023 ("Null-text Inversion", `next_step`): the same DDIM update with the
roles of a and a' exchanged, and the network queried at the target step t with x_s in place of the unknown
x_t, the approximation eps_theta(x_t, t) ~ eps_theta(x_s, t) that makes the inversion explicit.

The grid and the alpha_bar pairs are exactly those `sample_ddim` uses (the lowest grid step pairs with
alpha_bar_0), so `sample_ddim(denoiser, invert_ddim(denoiser, x0, schedule), schedule, eta=0)` returns x0
up to the error of that approximation, which is first order in the step size (for 50 steps about 1e-3 on
unit-Gaussian data, but several 1e-2 once the data is offset or narrow).

`fixed_point_iters = k > 0` removes it: each step then solves the implicit equation
x_t = F(x_s, eps_theta(x_t, t)) by k fixed-point iterations started from the explicit x_t (the idea of
Pan et al. 2023, "Effective Real Image Editing with Accelerated Iterative Diffusion Inversion", and
Garibi et al. 2024, "ReNoise"), at k more network evaluations per step. When the iteration converges, the
DDIM step from x_t lands back on x_s exactly, so the round trip is exact up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..parameterization import Denoiser, timesteps_like
from ..schedules import NoiseSchedule, ddim_timesteps
from .ddim import ddim_coefficients


@torch.no_grad()
def invert_ddim(
    denoiser: Denoiser,
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    spacing: str = "uniform",
    timesteps: Tensor | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    fixed_point_iters: int = 0,
) -> Tensor:
    """Map a clean sample x0 to the x_T from which deterministic DDIM (same grid) regenerates it.

    denoiser(x_t, t) -> x0_hat with t integer training steps ([B] int64).
    `timesteps` (ascending training steps) overrides `steps`/`spacing`; pass the same grid to `sample_ddim`.
    `fixed_point_iters` extra denoiser calls per step refine each step towards the exact inverse of DDIM's.
    callback receives {"x": x_t, "i": step index, "t": t, "denoised": x0_hat} after every step.
    """
    grid = ddim_timesteps(steps, schedule.num_timesteps, spacing) if timesteps is None else timesteps.long()
    if grid.ndim != 1 or grid.min() < 0 or grid.max() >= schedule.num_timesteps:
        raise ValueError(f"timesteps must be a 1-D grid inside [0, {schedule.num_timesteps})")
    if fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters must be >= 0, got {fixed_point_iters}")
    a_all, a_prev_all, _ = ddim_coefficients(schedule, grid, 0.0)
    x = x0
    for i in range(len(grid)):  # walk the grid from its bottom
        t = timesteps_like(x, int(grid[i]))
        a = a_all[i].to(x)
        a_prev = a_prev_all[i].to(x)
        x_s, x_t = x, x  # explicit form first: the network queried at x_s in place of x_t
        for _ in range(fixed_point_iters + 1):
            x0_hat = denoiser(x_t, t)
            eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()  # the network's eps, read at step t
            x0_step = (x_s - (1 - a_prev).sqrt() * eps_hat) / a_prev.sqrt()
            x_t = a.sqrt() * x0_step + (1 - a).sqrt() * eps_hat
        x = x_t
        if callback is not None:
            callback({"x": x, "i": i, "t": int(grid[i]), "denoised": x0_step})
    return x
