"""Samplers: one algorithm per file, all `sample_*(denoiser, x, schedule, *, generator, callback, ...)`."""

from .ddim import sample_ddim

SAMPLERS = {"ddim": sample_ddim}

__all__ = ["SAMPLERS", "sample_ddim"]
