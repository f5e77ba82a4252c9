"""Samplers: one algorithm per file.

Discrete-step samplers take `sample_*(denoiser, x_T, schedule, *, generator, callback, ...)` with
`denoiser(x_t, t) -> x0`; sigma-space samplers take `sample_*(D, x, sigmas, *, generator, callback, ...)` with
`D(x, sigma) -> x0` (see `sigmas.SigmaDenoiser`). `registry.run_sampler` runs any of them by name.
"""

from .ddim import sample_ddim
from .ddim_inversion import invert_ddim
from .ddpm import sample_ddpm
from .dpmpp_2m import sample_dpmpp_2m
from .dpmpp_2m_sde import sample_dpmpp_2m_sde
from .euler import sample_euler
from .euler_ancestral import sample_euler_ancestral
from .heun import sample_heun
from .lms import sample_lms
from .plms import sample_plms
from .registry import SAMPLERS, resolve_sampler, run_sampler

__all__ = [
    "SAMPLERS",
    "invert_ddim",
    "resolve_sampler",
    "run_sampler",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_plms",
]
