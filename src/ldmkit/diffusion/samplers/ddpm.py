"""Ancestral DDPM sampling (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", Algorithm 2).

Each step draws from the Gaussian posterior q(x_{t-1} | x_t, x_0) with x_0 replaced by the denoiser's
estimate (eq. 6-7):

    mu~_t = c1_t x0_hat + c2_t x_t,   c1_t = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t),
                                      c2_t = (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t)
    x_{t-1} = mu~_t + exp(log(beta~_t) / 2) z,   beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)

with the float32 buffers of `NoiseSchedule.buffers()` (log-variance clipped away from 0) and no noise on the
last step (t = 0), as LDM's `p_sample_loop`. A sub-grid of steps is also accepted: between grid neighbours
s < t the same formulas hold with the respaced beta = 1 - alpha_bar_t / alpha_bar_s (Nichol & Dhariwal
2021, sec. 4), and below the lowest grid step the chain ends at alpha_bar = 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..noise import randn_like
from ..parameterization import Denoiser, timesteps_like
from ..schedules import NoiseSchedule


def ddpm_coefficients(schedule: NoiseSchedule, timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(c1, c2, clipped log-variance) in float32 for each ascending grid step t, stepping to its predecessor.

    Where the predecessor is t - 1 (the full chain) these are the reference buffers themselves.
    """
    buf = schedule.buffers()
    t = timesteps.long()
    c1 = buf["posterior_mean_coef1"][t].clone()
    c2 = buf["posterior_mean_coef2"][t].clone()
    log_var = buf["posterior_log_variance_clipped"][t].clone()
    prev = torch.cat([t.new_tensor([-1]), t[:-1]])
    gap = prev != t - 1
    if gap.any():
        ac = schedule.alphas_cumprod
        a = ac[t[gap]]
        a_prev = torch.where(prev[gap] >= 0, ac[prev[gap].clamp(min=0)], torch.ones_like(a))
        beta = 1.0 - a / a_prev
        c1[gap] = (beta * a_prev.sqrt() / (1.0 - a)).float()
        c2[gap] = ((1.0 - a_prev) * (1.0 - beta).sqrt() / (1.0 - a)).float()
        var = beta * (1.0 - a_prev) / (1.0 - a)
        log_var[gap] = var.clamp(min=1e-20).log().float()
    return c1, c2, log_var


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    schedule: NoiseSchedule,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    mask: Tensor | None = None,
    x0: Tensor | None = None,
    timesteps: Tensor | None = None,
) -> Tensor:
    """Run the ancestral chain from x = x_T and return the final sample.

    denoiser(x_t, t) -> x0_hat with t integer training steps ([B] int64). `timesteps` (ascending training
    steps, strictly increasing) defaults to all T steps 0..T-1, walked from the top.
    Inpainting: where mask == 1 the known `x0` is kept, re-noised to the current step each iteration
    (as in sample_ddim); the sampler fills in where mask == 0.
    callback receives {"x": x_{t-1}, "i": step index, "t": t, "denoised": x0_hat} after every step.
    """
    if (mask is None) != (x0 is None):
        raise ValueError("inpainting needs both mask and x0")
    T = schedule.num_timesteps
    grid = torch.arange(T) if timesteps is None else timesteps.long().cpu()
    if grid.ndim != 1 or len(grid) == 0 or grid.min() < 0 or grid.max() >= T:
        raise ValueError(f"timesteps must be a 1-D grid inside [0, {T})")
    if len(grid) > 1 and not torch.all(grid[1:] > grid[:-1]):
        raise ValueError("timesteps must be strictly increasing")
    c1_all, c2_all, log_var_all = ddpm_coefficients(schedule, grid)
    n = len(grid)
    for i in range(n):
        index = n - 1 - i
        t = timesteps_like(x, int(grid[index]))
        if mask is not None:
            assert x0 is not None  # mask and x0 come together (checked above)
            noise = randn_like(x, generator)
            x = schedule.q_sample(x0, t, noise) * mask + (1 - mask) * x
        x0_hat = denoiser(x, t)
        x = c1_all[index].to(x) * x0_hat + c2_all[index].to(x) * x
        if index > 0:  # the last step returns the posterior mean
            noise = randn_like(x, generator)
            x = x + (0.5 * log_var_all[index].to(x)).exp() * noise
        if callback is not None:
            callback({"x": x, "i": i, "t": int(grid[index]), "denoised": x0_hat})
    return x
