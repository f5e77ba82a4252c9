"""Load an original CompVis LDM / Stable Diffusion checkpoint into ldmkit modules, strictly and offline.

    loaded = load_ldm_checkpoint("sd-v1-5.safetensors")            # variant detected from keys and shapes
    loaded = load_ldm_checkpoint("768-v-ema.ckpt", use_ema=False, prediction="v")
    loaded = load_ldm_checkpoint("model.ckpt", config="models/ldm/cin256/config.yaml")   # original YAML

Every part must fit exactly: nothing is loaded unless the UNet, first stage and cond stage all match their
modules key for key and shape for shape (the error lists each difference). The schedule buffers stored in
the file must equal the ones the configuration computes, which catches a config with the wrong betas.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from ..config import LDMConfig, load_config, load_first_stage_config
from ..ldm.build import LDMParts, build_autoencoder, build_conditioner, build_schedule, build_unet
from ..models.autoencoder_kl import AutoencoderConfig, AutoencoderKL
from ..models.vq import VQModel
from .ckpt_reader import RawCheckpoint, read_checkpoint
from .compvis import (
    OPTIONAL_ROOT_KEYS,
    CheckpointMismatchError,
    CheckpointParts,
    KeyReport,
    ema_unet_state,
    load_parts_strict,
    split_checkpoint,
)
from .compvis_config import ldm_config_from_compvis
from .detect import Variant, detect_first_stage, detect_variant

PREDICTIONS = ("eps", "x0", "v")


@dataclass
class LoadedLDM:
    config: LDMConfig
    parts: LDMParts
    variant: Variant
    used_ema: bool
    meta: dict


def resolve_config(config: str | Path | LDMConfig) -> LDMConfig:
    """An LDMConfig, a preset name, an ldmkit YAML, or an original CompVis/Stability YAML (model: target/params)."""
    if isinstance(config, LDMConfig):
        return copy.deepcopy(config)
    p = Path(config)
    if p.suffix in (".yaml", ".yml") and p.exists():
        doc = yaml.safe_load(p.read_text())
        if isinstance(doc, dict) and isinstance(doc.get("model"), dict) and "target" in doc["model"]:
            return ldm_config_from_compvis(doc)
    return load_config(config)


def _check_schedule(parts: CheckpointParts, cfg: LDMConfig, schedule_buffers: dict[str, Tensor]) -> None:
    for name, stored in parts.schedule.items():
        ours = schedule_buffers.get(name)
        if ours is None or ours.shape != stored.shape:
            raise ValueError(f"the checkpoint's schedule buffer {name} {tuple(stored.shape)} does not fit the config "
                             f"({cfg.schedule.num_timesteps} steps)")
        if not torch.allclose(ours.double(), stored.double(), rtol=1e-4, atol=1e-6):
            s = cfg.schedule
            raise ValueError(
                f"the checkpoint's {name} differ from the config's schedule ({s.kind}, {s.linear_start} .. "
                f"{s.linear_end}); stored betas[0] = {float(parts.schedule.get('betas', stored)[0]):.6g}: "
                "pass the model's own config"
            )


def load_ldm_checkpoint(
    path: str | Path,
    *,
    config: str | Path | LDMConfig | None = None,
    use_ema: bool = False,
    prediction: str | None = None,
    raw: RawCheckpoint | None = None,
    check_only: bool = False,
) -> LoadedLDM:
    """Read, identify, build and strictly load a LatentDiffusion checkpoint (.ckpt or .safetensors).

    check_only=True builds the modules on the meta device (no memory for weights) and only verifies that
    every key and shape fits: `ldmkit info --check` on a 4 GB file without allocating 4 GB.
    """
    raw = raw or read_checkpoint(path)
    parts = split_checkpoint(raw.tensors)
    if config is None:
        variant = detect_variant(parts, path)
        assert variant.preset is not None  # detection names a preset or raises UnknownCheckpointError
        cfg = load_config(variant.preset)
    else:
        cfg = resolve_config(config)
        variant = Variant("custom", None, "ldm", cfg.parameterization, notes=[f"config given: {config}"])
    if prediction is not None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        cfg.parameterization = variant.parameterization = prediction
    # the UNet, nearly all of the weights, is always built on the meta device: loading then adopts the file's
    # tensors (`load_parts_strict`) rather than filling a randomly initialised copy of the same size
    with torch.device("meta"):
        unet = build_unet(cfg)
    with torch.device("meta" if check_only else "cpu"):
        autoencoder, conditioner = build_autoencoder(cfg), build_conditioner(cfg)
    schedule = build_schedule(cfg)
    if use_ema and not parts.has_ema:
        raise ValueError(f"{path} has no EMA weights (no model_ema.* keys); load without use_ema")
    unet_state = ema_unet_state(parts, unet) if use_ema else parts.unet
    root = KeyReport("root keys", unexpected=sorted(k for k in parts.other if k not in OPTIONAL_ROOT_KEYS))
    if not root.ok:
        raise CheckpointMismatchError([root], f"{path}")
    load_parts_strict([
        ("UNet (model.diffusion_model.*)", unet, unet_state),
        ("first stage (first_stage_model.*)", autoencoder, parts.first_stage),
        ("cond stage (cond_stage_model.*)", conditioner, parts.cond_stage),
    ], f"{path}", check_only=check_only)
    _check_schedule(parts, cfg, schedule.buffers())
    if "scale_factor" in parts.other:  # scale_by_std models store the estimated factor as a buffer
        cfg.scale_factor = float(parts.other["scale_factor"])
    ldm = LDMParts(unet.eval(), autoencoder.eval(), None if conditioner is None else conditioner.eval(), schedule)
    return LoadedLDM(cfg, ldm, variant, use_ema, raw.meta)


def load_first_stage_checkpoint(
    path: str | Path, *, config: str | Path | AutoencoderConfig | None = None
) -> tuple[AutoencoderKL | VQModel, Variant]:
    """An autoencoder file of the LD zoo (keys encoder.*, decoder.*, quant_conv.*, ...; loss.* is ignored)."""
    raw = read_checkpoint(path)
    state = {k: v for k, v in raw.tensors.items() if not k.startswith("loss.")}
    if any(k.startswith("first_stage_model.") for k in state):  # an LDM file: take its first stage
        state = split_checkpoint(state).first_stage
    variant = detect_first_stage(state)
    if isinstance(config, AutoencoderConfig):
        ae_cfg = config
    else:
        assert variant.preset is not None  # detect_first_stage always names a preset
        ae_cfg = load_first_stage_config(config if config is not None else variant.preset)
    model = VQModel(ae_cfg) if ae_cfg.kind == "vq" else AutoencoderKL(ae_cfg)
    load_parts_strict([("first stage", model, state)], f"{path}")
    return model.eval(), variant
