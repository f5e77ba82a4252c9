"""Gaussian noise drawn from a caller's generator (or one generator per sample), on any device.

A `torch.Generator` lives on one device. Drawing on the generator's device and moving the result makes the
same seed give the same noise (and so the same picture) on CPU and GPU, as diffusers does with CPU
generators; a CUDA generator with CUDA tensors draws in place.

A list of generators, one per batch item, draws each item's noise from its own generator: sample i of a
batch then sees exactly the noise it would see alone, so a batch of seeds s, s+1, ... reproduces single
runs with those seeds image by image (A1111 and diffusers give per-image seeds the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators = None, *, dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu") -> Tensor:
    """N(0, I) noise of `shape` on `device`; a list of generators draws item b of dim 0 from generator b."""
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        where = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, dtype=dtype, device=where).to(device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"{len(gens)} generators for a batch of {shape[0]}: give one per sample")
    items = [torch.randn(shape[1:], generator=g, dtype=dtype, device=g.device).to(device) for g in gens]
    return torch.stack(items)  # [B, *shape[1:]]


def randn_like(x: Tensor, generator: Generators = None) -> Tensor:
    """N(0, I) noise shaped like `x`, in x's dtype and on x's device, drawn from `generator` (or one per item)."""
    return randn(x.shape, generator, dtype=x.dtype, device=x.device)
