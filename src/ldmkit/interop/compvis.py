"""The CompVis / Stable Diffusion checkpoint layout: split by prefix, EMA weights, strict loading with a report.

An original `LatentDiffusion` state dict holds, at its root:
  model.diffusion_model.*  the UNet          first_stage_model.*  the autoencoder (KL or VQ)
  cond_stage_model.*       the conditioner   model_ema.*          LitEma shadows of the UNet (optional)
  betas, alphas_cumprod, ... twelve schedule buffers registered by `DDPM.register_schedule`.
LitEma names each shadow after the parameter of `model` (the DiffusionWrapper) with every dot removed:
`model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`, plus the
scalars `model_ema.decay` and `model_ema.num_updates`. Our modules use the reference names, so after removing a
prefix a part loads with `load_state_dict(strict=True)`; nothing is renamed except the EMA shadows, whose dots
the reference itself removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..ldm.build import COND_STAGE_PREFIX, EMA_PREFIX, FIRST_STAGE_PREFIX, UNET_PREFIX, ema_name, load_strict
from ..ldm.checkpoint import KeyReport, compare_state

EMA_SCALARS = ("decay", "num_updates")
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip
# Keys some checkpoints carry at the root that hold no weights we need (LD's learned-logvar / std scaling).
OPTIONAL_ROOT_KEYS = ("logvar", "scale_factor", "lvlb_weights", "model_ema.decay", "model_ema.num_updates")


@dataclass
class CheckpointParts:
    """A LatentDiffusion state dict split by prefix; each part keyed as its module names its tensors."""

    unet: dict[str, Tensor] = field(default_factory=dict)
    first_stage: dict[str, Tensor] = field(default_factory=dict)
    cond_stage: dict[str, Tensor] = field(default_factory=dict)
    ema: dict[str, Tensor] = field(default_factory=dict)  # LitEma names (dots removed), without "model_ema."
    schedule: dict[str, Tensor] = field(default_factory=dict)
    other: dict[str, Tensor] = field(default_factory=dict)  # anything else at the root

    @property
    def has_ema(self) -> bool:
        return any(k not in EMA_SCALARS for k in self.ema)


def split_checkpoint(state: dict[str, Tensor]) -> CheckpointParts:
    """Split a flat LatentDiffusion-style state dict by its top-level prefixes."""
    parts = CheckpointParts()
    for k, v in state.items():
        if k.startswith(UNET_PREFIX):
            parts.unet[k[len(UNET_PREFIX) :]] = v
        elif k.startswith(FIRST_STAGE_PREFIX):
            parts.first_stage[k[len(FIRST_STAGE_PREFIX) :]] = v
        elif k.startswith(COND_STAGE_PREFIX):
            parts.cond_stage[k[len(COND_STAGE_PREFIX) :]] = v
        elif k.startswith(EMA_PREFIX):
            parts.ema[k[len(EMA_PREFIX) :]] = v
        elif k in SCHEDULE_BUFFERS:
            parts.schedule[k] = v
        else:
            parts.other[k] = v
    return parts


def ema_unet_state(parts: CheckpointParts, unet: nn.Module) -> dict[str, Tensor]:
    """The UNet state dict made of the EMA shadows: for every parameter of `unet` its LitEma shadow.

    Buffers are not tracked by LitEma and come from the non-EMA weights. Raises KeyError-style ValueError
    listing parameters that have no shadow.
    """
    out = dict(parts.unet)
    missing = []
    for name, _ in unet.named_parameters():
        shadow = parts.ema.get(ema_name(name))
        if shadow is None:
            missing.append(name)
        else:
            out[name] = shadow
    if missing:
        raise ValueError(
            f"the checkpoint's EMA weights miss {len(missing)} UNet parameter(s), e.g. {missing[0]} "
            f"(expected model_ema.{ema_name(missing[0])}); load without use_ema"
        )
    return out


# ------------------------------------------------------------------------------------------ strict loading


class CheckpointMismatchError(ValueError):
    """Strict loading failed; the message is a readable report of every part that does not fit."""

    def __init__(self, reports: list[KeyReport], what: str = "checkpoint") -> None:
        self.reports = [r for r in reports if not r.ok]
        body = "\n".join(r.format() for r in self.reports)
        super().__init__(f"{what} does not fit the model:\n{body}")


def compare_keys(module: nn.Module, state: dict[str, Tensor], part: str) -> KeyReport:
    return compare_state(module.state_dict(), state, part)


def load_parts_strict(pairs: list[tuple[str, nn.Module | None, dict[str, Tensor]]], what: str = "checkpoint",
                      *, check_only: bool = False) -> None:
    """Check every (part name, module, state) first, then load all of them strictly; nothing loads on error.

    A part whose module is None must have an empty state (e.g. an unconditional model's cond stage).
    check_only: compare keys and shapes only (modules may live on the meta device).
    """
    reports = []
    for part, module, state in pairs:
        if module is None:
            if state:
                reports.append(KeyReport(part, unexpected=sorted(state)))
            continue
        reports.append(compare_keys(module, state, part))
    if any(not r.ok for r in reports):
        raise CheckpointMismatchError(reports, what)
    if check_only:
        return
    with torch.no_grad():
        for part, module, state in pairs:
            if module is None:
                continue
            if any(t.is_meta for t in module.parameters()) or all(
                    p.dtype == torch.float32 for p in module.parameters()):
                # the module adopts the file's tensors instead of copying them (float16 ones are cast once), so
                # loading an SD file costs its size once, not twice: a copy would sit beside a safetensors
                # file's mapped pages, which stay resident while the UNet uses the same mapping
                load_strict(module, state, part, assign=True)
            else:
                # dtype follows the module (float16 files load into float32 models and vice versa)
                module.load_state_dict(state, strict=True)
