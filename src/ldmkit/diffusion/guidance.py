"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser -> denoiser wrapper.

D_guided = D_uncond + w (D_cond - D_uncond). The reference code mixes eps (or v) outputs; every
parameterisation is affine in the network output for a fixed x_t, so mixing the x0 estimates is the same
operation. Conditional and unconditional evaluations run as one batch, unconditional first, as in LDM.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .parameterization import Denoiser


def _cat_cond(uncond: Mapping[str, Any], cond: Mapping[str, Any]) -> dict[str, Any]:
    if set(uncond) != set(cond):
        raise ValueError(f"cond and uncond must carry the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out: dict[str, Any] = {}
    for k, c in cond.items():
        u = uncond[k]
        if isinstance(c, Tensor):
            if not isinstance(u, Tensor) or u.shape != c.shape:
                raise ValueError(f"uncond[{k!r}] must be a tensor shaped like cond[{k!r}] {tuple(c.shape)}")
            out[k] = torch.cat([u, c])  # [2B, ...]: unconditional half first
        elif u == c:
            out[k] = c
        else:
            raise ValueError(f"non-tensor conditioning {k!r} differs between cond and uncond")
    return out


def guided_denoiser(
    denoiser: Callable[..., Tensor],
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None,
    scale: float,
) -> Denoiser:
    """Bind conditioning and apply classifier-free guidance with weight `scale` (1 = no guidance)."""
    if scale == 1.0 or uncond is None:
        return lambda x, t: denoiser(x, t, cond)
    both = _cat_cond(uncond, cond)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        d_u, d_c = denoiser(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return d_u + scale * (d_c - d_u)

    return fn
