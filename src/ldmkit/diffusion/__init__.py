"""Pure diffusion math on tensors: schedules, parameterisations, objective, guidance, samplers.

Knows no model class: a model is any callable `model(x_t, t, **cond) -> Tensor`.
"""

from .guidance import guided_denoiser
from .objective import diffusion_loss
from .parameterization import DiscreteDenoiser
from .samplers import SAMPLERS, run_sampler, sample_ddim
from .schedules import NoiseSchedule, ddim_timesteps, make_beta_schedule

__all__ = [
    "SAMPLERS",
    "DiscreteDenoiser",
    "NoiseSchedule",
    "ddim_timesteps",
    "diffusion_loss",
    "guided_denoiser",
    "make_beta_schedule",
    "run_sampler",
    "sample_ddim",
]
