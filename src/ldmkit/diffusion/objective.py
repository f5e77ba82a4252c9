"""The denoising training objective (Ho et al. 2020, eq. 14 "L_simple"; LDM eq. 2 in latent space).

    L = E_{x0, eps ~ N(0, I), t ~ U{0..T-1}} w(t) || target(x0, eps, t) - model(x_t, t, cond) ||

with x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, target eps / x0 / v, the norm l2 (mean
squared) or l1, and w(t) uniform or min-SNR-gamma (Hang et al. 2023).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .noise import randn_like
from .parameterization import ModelFn, call_model, training_target
from .schedules import NoiseSchedule, _gather

LOSS_TYPES = ("l2", "l1")
WEIGHTINGS = ("uniform", "min_snr")


def loss_weight(
    schedule: NoiseSchedule, t: Tensor, parameterization: str, weighting: str, gamma: float = 5.0
) -> Tensor:
    """Per-sample weight w(t), [B] float32.

    min-SNR-gamma: w = min(SNR, gamma) / SNR for eps targets, min(SNR, gamma) for x0 targets and
    min(SNR, gamma) / (SNR + 1) for v targets (Hang et al. 2023, eq. 8 and its v form).
    """
    if weighting == "uniform":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}")
    snr = schedule.snr(t)
    clipped = snr.clamp(max=gamma)
    w = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[parameterization]
    return w.float().to(t.device)


def diffusion_loss(
    model: ModelFn,
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    cond: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    parameterization: str = "eps",
    loss_type: str = "l2",
    weighting: str = "uniform",
) -> Tensor:
    """A Monte-Carlo estimate of L on one batch: draws t and eps from `generator`, returns a scalar."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; choose one of {LOSS_TYPES}")
    b = x0.shape[0]
    # drawn where the generator lives (a CPU generator keeps a GPU run's draws those of the CPU run)
    t_device = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator, device=t_device).to(x0.device)
    eps = randn_like(x0, generator)
    x_t = schedule.q_sample(x0, t, eps)
    target = training_target(parameterization, x0, eps, _gather(schedule.alphas_cumprod, t, x0))
    out = call_model(model, x_t, t, cond)
    err = (out - target).abs() if loss_type == "l1" else (out - target) ** 2
    per_sample = err.flatten(1).mean(1)  # [B]
    return (loss_weight(schedule, t, parameterization, weighting) * per_sample).mean()
