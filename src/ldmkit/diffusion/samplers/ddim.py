"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

One step from t to the previous grid step s, with a = alpha_bar_t, a' = alpha_bar_s (eq. 12):

    x_s = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')                        (eq. 16)

eta = 0 is the deterministic sampler, eta = 1 the DDPM-like ancestral one. The step grid and the float32
arithmetic follow LDM's DDIMSampler, so that its trajectories are reproduced: in particular the last step
lands on alpha_bar of step 0 (a' = 0.99915 for Stable Diffusion), not on a' = 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..noise import randn_like
from ..parameterization import Denoiser, timesteps_like
from ..schedules import NoiseSchedule, ddim_timesteps


def ddim_coefficients(
    schedule: NoiseSchedule, timesteps: Tensor, eta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(a, a', sigma) for each grid step, ascending, as LDM's `make_ddim_sampling_parameters`.

    a is the float32 alpha_bar table at the grid, a' its predecessor on the grid (alpha_bar_0 for the
    first), sigma from eq. 16 in float64.
    """
    ac = schedule.alphas_cumprod_f32
    a = ac[timesteps]
    a_prev = torch.cat([ac[:1], ac[timesteps[:-1]]]).double()
    a64 = a.double()
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a64) * (1 - a64 / a_prev))
    return a, a_prev, sigma


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "uniform",
    timesteps: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    mask: Tensor | None = None,
    x0: Tensor | None = None,
    init: Tensor | None = None,
    strength: float = 1.0,
) -> Tensor:
    """Run DDIM from x = x_T down the step grid and return the final sample.

    denoiser(x_t, t) -> x0_hat with t integer training steps ([B] int64).
    `timesteps` (ascending training steps) overrides `steps`/`spacing`.
    Inpainting: where mask == 1 the known `x0` is kept, re-noised to the current step each iteration
    (LDM's DDIM `mask`/`x0`); the sampler fills in where mask == 0.
    img2img (SDEdit, Meng et al. 2022): with `init` given, only the last `round(strength * S)` grid steps
    run, starting from init noised to the first of them with `x` as the noise.
    callback receives {"x": x_s, "i": step index, "t": t, "denoised": x0_hat} after every step.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if (mask is None) != (x0 is None):
        raise ValueError("inpainting needs both mask and x0")
    grid = ddim_timesteps(steps, schedule.num_timesteps, spacing) if timesteps is None else timesteps.long()
    if grid.ndim != 1 or grid.min() < 0 or grid.max() >= schedule.num_timesteps:
        raise ValueError(f"timesteps must be a 1-D grid inside [0, {schedule.num_timesteps})")
    a_all, a_prev_all, sigma_all = ddim_coefficients(schedule, grid, eta)
    n = len(grid)
    if init is not None:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if init.shape != x.shape:
            raise ValueError(f"init shape {tuple(init.shape)} differs from the noise shape {tuple(x.shape)}")
        n = max(1, round(strength * n))  # run grid[:n] from its top, as diffusers' img2img does
        x = schedule.q_sample(init, timesteps_like(x, int(grid[n - 1])), x)
    for i in range(n):
        index = n - 1 - i  # walk the grid from its top
        t = timesteps_like(x, int(grid[index]))
        if mask is not None:
            assert x0 is not None  # mask and x0 come together (checked above)
            noise = randn_like(x, generator)
            known = schedule.q_sample(x0, t, noise)
            x = known * mask + (1 - mask) * x
        # scalars as float32 tensors on x's device, as the reference builds them with torch.full
        a = a_all[index].to(x)
        a_prev = a_prev_all[index].to(x)
        sigma = sigma_all[index].to(x)
        x0_hat = denoiser(x, t)
        eps_hat = (x - a.sqrt() * x0_hat) / (1 - a).sqrt()
        dir_xt = (1.0 - a_prev - sigma**2).sqrt() * eps_hat  # "direction pointing to x_t" (eq. 12)
        x = a_prev.sqrt() * x0_hat + dir_xt
        if eta > 0:
            x = x + sigma * randn_like(x, generator)
        if callback is not None:
            callback({"x": x, "i": i, "t": int(grid[index]), "denoised": x0_hat})
    return x
