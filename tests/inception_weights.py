"""Deterministic random FID-Inception weights and test images, shared by the parity test and the script that
made its fixture (tests/fixtures/make_inception_fixture.py)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def random_inception_state(shapes: dict[str, list[int]]) -> dict[str, Tensor]:
    """Weights drawn in sorted key order from one seeded generator, scaled so activations neither vanish nor
    explode through the 94 layers: He-scaled convolutions, batch norms near identity."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k in sorted(shapes):
        shape = shapes[k]
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(0)
        elif k.endswith("conv.weight") or k == "fc.weight":
            fan_in = math.prod(shape[1:])
            out[k] = torch.randn(shape, generator=g) * math.sqrt((2.0 if "conv" in k else 1.0) / fan_in)
        elif k.endswith("running_var"):
            out[k] = 1 + 0.2 * torch.rand(shape, generator=g)
        elif k.endswith("bn.weight"):
            out[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:  # bn.bias, running_mean, fc.bias
            out[k] = 0.1 * torch.randn(shape, generator=g)
    return out


def fixture_images() -> Tensor:
    """Two uint8 RGB images [2, 3, 40, 48]: a smooth gradient and seeded noise (40 x 48 -> 299 x 299 resize)."""
    g = torch.Generator().manual_seed(1)
    ramp = torch.linspace(0, 255, 48).expand(3, 40, 48)
    noise = torch.randint(0, 256, (3, 40, 48), generator=g).float()
    return torch.stack([ramp, noise]).round().to(torch.uint8)
