"""Gaussian noise drawn from a caller's generator, on any device.

A `torch.Generator` lives on one device. Drawing on the generator's device and moving the result makes the
same seed give the same noise (and so the same picture) on CPU and GPU, as diffusers does with CPU
generators; a CUDA generator with CUDA tensors draws in place.
"""

from __future__ import annotations

import torch
from torch import Tensor


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """N(0, I) noise shaped like `x`, in x's dtype and on x's device, drawn from `generator`."""
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device)
    return noise.to(x.device)
