"""Sampler names as users know them (reference code, diffusers, A1111, ComfyUI) and one way to run any of them.

Two families share the registry:
  discrete  - DDIM, PLMS, DDPM walk the model's integer training steps: `fn(denoiser, x_T, schedule, ...)`;
  sigma     - Euler, Heun, LMS, DPM++ ... integrate in k-diffusion's sigma space over a sigma grid:
              `fn(D, x, sigmas, ...)` with D(x, sigma) = SigmaDenoiser(denoiser, schedule).
A name may end in a grid: "DPM++ 2M Karras", "euler exponential"; without one the sigma family uses the
model's own discrete grid ("normal": training steps evenly spaced, as k-diffusion / A1111 do).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..noise import Generators
from ..parameterization import Denoiser
from ..schedules import NoiseSchedule
from ..sigmas import SigmaDenoiser, discrete_sigma_grid, exponential_sigmas, karras_sigmas, sigma_to_t
from .ddim import sample_ddim
from .ddpm import sample_ddpm
from .dpmpp_2m import sample_dpmpp_2m
from .dpmpp_2m_sde import sample_dpmpp_2m_sde
from .euler import sample_euler
from .euler_ancestral import sample_euler_ancestral
from .heun import sample_heun
from .lms import sample_lms
from .plms import sample_plms


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    family: str  # "discrete" or "sigma"
    fn: Callable[..., Tensor]
    stochastic: bool  # draws fresh noise every step (uses the generator)


SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in [
        SamplerSpec("ddim", "discrete", sample_ddim, False),
        SamplerSpec("plms", "discrete", sample_plms, False),
        SamplerSpec("ddpm", "discrete", sample_ddpm, True),
        SamplerSpec("euler", "sigma", sample_euler, False),
        SamplerSpec("euler_ancestral", "sigma", sample_euler_ancestral, True),
        SamplerSpec("heun", "sigma", sample_heun, False),
        SamplerSpec("lms", "sigma", sample_lms, False),
        SamplerSpec("dpmpp_2m", "sigma", sample_dpmpp_2m, False),
        SamplerSpec("dpmpp_2m_sde", "sigma", sample_dpmpp_2m_sde, True),
    ]
}

# lower-case, single-spaced spellings -> canonical names
ALIASES: dict[str, str] = {
    "pndm": "plms",
    "ancestral": "ddpm",
    "euler a": "euler_ancestral",
    "euler_a": "euler_ancestral",
    "k_euler": "euler",
    "k_euler_a": "euler_ancestral",
    "k_euler_ancestral": "euler_ancestral",
    "k_heun": "heun",
    "k_lms": "lms",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++2m": "dpmpp_2m",
    "dpmsolver++": "dpmpp_2m",
    "dpm solver++": "dpmpp_2m",
    "dpm++ 2m sde": "dpmpp_2m_sde",
    "dpm++2m sde": "dpmpp_2m_sde",
}

SIGMA_GRIDS = ("normal", "karras", "exponential")


def resolve_sampler(name: str) -> tuple[SamplerSpec, str | None]:
    """(spec, sigma grid) for a user-facing name such as "DPM++ 2M Karras", "Euler a" or "plms"."""
    key = " ".join(name.lower().replace("-", " ").split())
    grid = None
    for g in SIGMA_GRIDS:
        if key.endswith(" " + g):
            key, grid = key[: -len(g) - 1], g
    key = ALIASES.get(key, key).replace(" ", "_")
    if key not in SAMPLERS:
        names = ", ".join(sorted(SAMPLERS))
        raise ValueError(f"unknown sampler {name!r}; choose one of {names} (or an alias like 'DPM++ 2M Karras')")
    spec = SAMPLERS[key]
    if grid is not None and spec.family != "sigma":
        raise ValueError(f"sampler {spec.name!r} walks the model's own steps and takes no {grid!r} sigma grid")
    return spec, grid


def sigma_grid(schedule: NoiseSchedule, steps: int, grid: str = "normal") -> Tensor:
    """steps + 1 descending sigmas ending in 0, spanning the model's trained sigma range."""
    sig = SigmaDenoiser(lambda x, t: x, schedule)  # only for its sigma range
    if grid == "normal":
        return discrete_sigma_grid(schedule, steps, "linspace", interpolation="log")
    if grid == "karras":
        return karras_sigmas(steps, sig.sigma_min, sig.sigma_max)
    if grid == "exponential":
        return exponential_sigmas(steps, sig.sigma_min, sig.sigma_max)
    raise ValueError(f"unknown sigma grid {grid!r}; choose one of {', '.join(SIGMA_GRIDS)}")


def run_sampler(
    name: str,
    denoiser: Denoiser,
    noise: Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int,
    eta: float | None = None,
    generator: Generators = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    mask: Tensor | None = None,
    x0: Tensor | None = None,
    init: Tensor | None = None,
    strength: float = 1.0,
) -> Tensor:
    """Sample with any registered sampler from unit Gaussian `noise`; returns x_0 (VP space). Fresh noise comes
    from `generator`, or from one generator per batch item (`diffusion.noise.randn`).

    Inpainting (`mask`, `x0`): where mask == 1 the known x0 is kept. The discrete samplers re-noise it to
    every step (LDM's DDIM/PLMS `mask`/`x0`); the sigma samplers replace the denoiser's estimate by x0 there,
    which makes the known region follow its exact probability-flow path x0 + (x_T - x0) sigma / sigma_T.
    img2img (`init`, `strength`): only the last round(strength * steps) steps run, starting from `init`
    noised to the first of them with `noise` (SDEdit, Meng et al. 2022).
    """
    spec, grid = resolve_sampler(name)
    if (mask is None) != (x0 is None):
        raise ValueError("inpainting needs both mask and x0")
    if init is not None and not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    kwargs: dict[str, Any] = {"generator": generator, "callback": callback}
    params = inspect.signature(spec.fn).parameters
    if eta is not None:
        if "eta" in params:
            kwargs["eta"] = eta
        elif eta != 0 and not (spec.stochastic and eta == 1):
            raise ValueError(f"sampler {spec.name!r} takes no eta (got {eta})")
    if spec.family == "discrete":
        for key, value in (("mask", mask), ("x0", x0), ("init", init)):
            if value is not None:
                if key not in params:
                    what = "img2img" if key == "init" else "inpainting"
                    raise ValueError(f"sampler {spec.name!r} does not support {what}")
                kwargs[key] = value
        if init is not None:
            kwargs["strength"] = strength
        if "steps" in params:
            kwargs["steps"] = steps
        elif steps != schedule.num_timesteps:  # DDPM walks the full chain
            raise ValueError(f"ddpm runs all {schedule.num_timesteps} training steps (got steps={steps}); "
                             "for fewer steps use ddim with eta 1, its respaced equivalent")
        return spec.fn(denoiser, noise, schedule, **kwargs)
    sigmas = sigma_grid(schedule, steps, grid or "normal").to(noise.device)
    sigma_denoiser = SigmaDenoiser(denoiser, schedule)
    D: Callable[[Tensor, Tensor], Tensor] = sigma_denoiser
    if callback is not None:
        user_callback, table = callback, sigma_denoiser.sigmas

        def with_t(info: dict[str, Any]) -> None:
            # one vocabulary for both families: also report the (fractional) training step of sigma
            info["t"] = float(sigma_to_t(torch.as_tensor(info["sigma"]).reshape(1), table)[0])
            user_callback(info)

        kwargs["callback"] = with_t
    if mask is not None:
        assert x0 is not None  # mask and x0 come together (checked above)
        inner = D

        def D(x: Tensor, sigma: Tensor) -> Tensor:  # noqa: N802  (k-diffusion's name for the denoiser)
            return mask * x0 + (1 - mask) * inner(x, sigma)

    if init is not None:
        if init.shape != noise.shape:
            raise ValueError(f"init shape {tuple(init.shape)} differs from the noise shape {tuple(noise.shape)}")
        n = len(sigmas) - 1
        sigmas = sigmas[n - max(1, round(strength * n)) :]
        x = init + noise * sigmas[0]  # the variance-exploding view of q(x_t | init)
    else:
        # x_T / sqrt(alpha_bar_T) has standard deviation sqrt(1 + sigma_max^2) under the forward process
        x = noise * (1 + sigmas[0] ** 2) ** 0.5
    return spec.fn(D, x, sigmas, **kwargs)
