"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser -> denoiser wrapper.

D_guided = D_uncond + w (D_cond - D_uncond). The reference code mixes eps (or v) outputs; every
parameterisation is affine in the network output for a fixed x_t, so mixing the x0 estimates is the same
operation. Conditional and unconditional evaluations run as one batch, unconditional first, as in LDM.

Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4,
eqs. 15-17): a large w inflates the prediction's standard deviation (over-exposed images); with
x_cfg = x_neg + w (x_pos - x_neg),

    x_rescaled = x_cfg * std(x_pos) / std(x_cfg),        x_final = phi x_rescaled + (1 - phi) x_cfg,

std taken per sample over all non-batch dimensions. It is applied here to the x0 predictions, the
denoiser contract of this package; diffusers applies the same formula to the raw network output (eps or v),
so with phi > 0 its pictures differ slightly from ours.
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
    rescale: float = 0.0,
) -> Denoiser:
    """Bind conditioning and apply classifier-free guidance with weight `scale` (1 = no guidance).

    `rescale` is phi of guidance rescale (0 = off, Lin et al. recommend 0.7 with zero-terminal-SNR models).
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    if scale == 1.0 or uncond is None:
        return lambda x, t: denoiser(x, t, cond)
    both = _cat_cond(uncond, cond)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        d_u, d_c = denoiser(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        d = d_u + scale * (d_c - d_u)
        if rescale > 0:
            return rescale_guidance(d, d_c, rescale)
        return d

    return fn


def rescale_guidance(x_cfg: Tensor, x_pos: Tensor, phi: float) -> Tensor:
    """Lin et al. 2024 eqs. 15-17: blend x_cfg with x_cfg rescaled to the per-sample std of x_pos."""
    dims = list(range(1, x_cfg.ndim))
    std_pos = x_pos.std(dim=dims, keepdim=True)
    std_cfg = x_cfg.std(dim=dims, keepdim=True).clamp_min(torch.finfo(x_cfg.dtype).tiny)
    return phi * (x_cfg * (std_pos / std_cfg)) + (1 - phi) * x_cfg
