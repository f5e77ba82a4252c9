"""What a diffusion network predicts, and adapters that turn any prediction into one denoiser contract.

With x_t = sqrt(a) x_0 + sqrt(1 - a) eps (a = alpha_bar_t), a network may predict
  eps  (Ho et al. 2020),  x_0,  or  v = sqrt(a) eps - sqrt(1 - a) x_0  (Salimans & Ho 2022, sec. 4).
Each is an affine function of the others given x_t, so the samplers only ever see one contract:

    denoiser(x_t, t) -> x0_hat      (t: integer training steps, shape [B])

Conditioning is bound before the sampler sees the denoiser (see `guidance.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .schedules import NoiseSchedule, _gather

PARAMETERIZATIONS = ("eps", "x0", "v")

# model(x_t, t, **cond) -> raw network output
ModelFn = Callable[..., Tensor]
# denoiser(x_t, t) -> x0 estimate: what every sampler calls
Denoiser = Callable[[Tensor, Tensor], Tensor]


def x0_from_eps(x_t: Tensor, eps: Tensor, a: Tensor) -> Tensor:
    """x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a)   (DDPM eq. 4 solved for x_0)."""
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, a: Tensor) -> Tensor:
    """eps = (x_t - sqrt(a) x_0) / sqrt(1 - a)."""
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def x0_from_v(x_t: Tensor, v: Tensor, a: Tensor) -> Tensor:
    """x_0 = sqrt(a) x_t - sqrt(1 - a) v   (Salimans & Ho 2022, sec. 4)."""
    return a.sqrt() * x_t - (1 - a).sqrt() * v


def eps_from_v(x_t: Tensor, v: Tensor, a: Tensor) -> Tensor:
    """eps = sqrt(1 - a) x_t + sqrt(a) v."""
    return (1 - a).sqrt() * x_t + a.sqrt() * v


def v_from_x0_eps(x0: Tensor, eps: Tensor, a: Tensor) -> Tensor:
    """v = sqrt(a) eps - sqrt(1 - a) x_0."""
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def training_target(parameterization: str, x0: Tensor, eps: Tensor, a: Tensor) -> Tensor:
    """What the network should output for x_t built from (x0, eps) at alpha_bar a."""
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from_x0_eps(x0, eps, a)
    raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}")


def call_model(model: ModelFn, x: Tensor, t: Tensor, cond: Mapping[str, Any] | None) -> Tensor:
    """model(x, t, **cond): conditioning travels as keyword tensors (context=..., y=..., ...)."""
    return model(x, t, **(cond or {}))


class DiscreteDenoiser:
    """Wraps a network trained on a discrete schedule into `denoiser(x_t, t, cond) -> x0`.

    alpha_bar is read from the float32 table, gathered at the integer step, as the reference code does.
    """

    def __init__(self, model: ModelFn, schedule: NoiseSchedule, parameterization: str = "eps") -> None:
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}")
        self.model = model
        self.schedule = schedule
        self.parameterization = parameterization
        self._alphas_cumprod = schedule.alphas_cumprod_f32

    def __call__(self, x_t: Tensor, t: Tensor, cond: Mapping[str, Any] | None = None) -> Tensor:
        out = call_model(self.model, x_t, t, cond)
        if out.shape != x_t.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} differs from its input {tuple(x_t.shape)}")
        if self.parameterization == "x0":
            return out
        a = _gather(self._alphas_cumprod, t, x_t)
        if self.parameterization == "eps":
            return x0_from_eps(x_t, out, a)
        return x0_from_v(x_t, out, a)


def bind(denoiser: Callable[..., Tensor], cond: Mapping[str, Any] | None) -> Denoiser:
    """Fix the conditioning of a `denoiser(x, t, cond)`, giving the two-argument form samplers take."""

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return denoiser(x, t, cond)

    return fn


def timesteps_like(x: Tensor, t: int) -> Tensor:
    """A [B] int64 tensor filled with step t, on x's device."""
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
