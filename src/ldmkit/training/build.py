"""Plain-Python builders from `LDMConfig`, and the CompVis checkpoint layout of a latent diffusion model.

An ldmkit LDM checkpoint uses the prefixes of an original LatentDiffusion state dict, so the same loader
reads both: `model.diffusion_model.*` (UNet), `first_stage_model.*` (autoencoder), `cond_stage_model.*`
(conditioner) and the twelve root schedule buffers (`betas`, `alphas_cumprod`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import LDMConfig
from ..diffusion import NoiseSchedule
from ..models.autoencoder_kl import AutoencoderKL
from ..models.conditioners import ClassEmbedder
from ..models.unet import UNetModel

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."


def build_schedule(cfg: LDMConfig) -> NoiseSchedule:
    s = cfg.schedule
    return NoiseSchedule.make(s.kind, s.num_timesteps, s.linear_start, s.linear_end)


def build_autoencoder(cfg: LDMConfig) -> AutoencoderKL:
    return AutoencoderKL(cfg.autoencoder)


def build_unet(cfg: LDMConfig) -> UNetModel:
    return UNetModel(cfg.unet)


def build_conditioner(cfg: LDMConfig) -> ClassEmbedder | None:
    c = cfg.conditioning
    if c.kind == "none":
        return None
    if c.kind == "class":
        if cfg.unet.context_dim != c.embed_dim:
            raise ValueError(
                f"conditioning.embed_dim ({c.embed_dim}) must equal unet.context_dim ({cfg.unet.context_dim})"
            )
        # one extra row: the null class that stands for "no label" under classifier-free guidance
        return ClassEmbedder(c.n_classes + 1, c.embed_dim)
    raise ValueError(f"unknown conditioning kind {c.kind!r}; choose 'class' or 'none'")


@dataclass
class LDMParts:
    """The modules of a latent diffusion model, as a checkpoint holds them."""

    unet: UNetModel
    autoencoder: AutoencoderKL
    conditioner: ClassEmbedder | None
    schedule: NoiseSchedule


def ldm_state_dict(parts: LDMParts) -> dict[str, Tensor]:
    """One flat state dict with CompVis LatentDiffusion prefixes."""
    out: dict[str, Tensor] = {}
    out.update({UNET_PREFIX + k: v for k, v in parts.unet.state_dict().items()})
    out.update({FIRST_STAGE_PREFIX + k: v for k, v in parts.autoencoder.state_dict().items()})
    if parts.conditioner is not None:
        out.update({COND_STAGE_PREFIX + k: v for k, v in parts.conditioner.state_dict().items()})
    out.update(parts.schedule.buffers())
    return out


def split_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_strict(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """load_state_dict(strict=True) with an error that names the part and the offending keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} of another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} in the model)")
        raise ValueError(f"{what} weights do not fit the configured model: " + "; ".join(parts))
    with torch.no_grad():
        module.load_state_dict(state, strict=True)
