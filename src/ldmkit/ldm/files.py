"""The files a finished run leaves: the inference checkpoint of each stage, and how to write and read them.

An LDM file holds CompVis-prefixed weights (`ldm.build.ldm_state_dict`) with the config and the latent scale
factor in its metadata, so the pipeline rebuilds the model from the file alone. A first-stage file holds the
autoencoder's own state dict and its config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import LDMConfig, from_dict, to_dict
from ..models.autoencoder_kl import AutoencoderConfig
from .build import (
    COND_STAGE_PREFIX,
    FIRST_STAGE_PREFIX,
    UNET_PREFIX,
    AnyFirstStage,
    LDMParts,
    build_autoencoder,
    build_conditioner,
    build_first_stage,
    build_schedule,
    build_unet,
    ldm_state_dict,
    load_strict,
    split_prefix,
)
from .checkpoint import META_KEY, CheckpointError, load_checkpoint, save_checkpoint

LDM_FILE = "ldm.safetensors"  # a run's latent diffusion model (EMA weights), what `Pipeline.from_checkpoint` reads
AUTOENCODER_FILE = "autoencoder.safetensors"  # a run's first stage


def save_ldm(path: Path, parts: LDMParts, cfg: LDMConfig, scale_factor: float) -> None:
    """The inference checkpoint: CompVis-prefixed weights, config and scale factor in the metadata."""
    save_checkpoint(path, ldm_state_dict(parts),
                    {"kind": "ldm", "config": to_dict(cfg), "scale_factor": scale_factor})


@dataclass
class LDMFile:
    """What an ldmkit LDM file rebuilds: the config, the parts with the file's weights, the latent scale."""

    config: LDMConfig
    parts: LDMParts
    scale_factor: float
    tensors: dict[str, torch.Tensor]  # every tensor of the file (EMA shadows included), memory-mapped


def is_ldmkit_file(path: Path) -> bool:
    """A safetensors file written by ldmkit (our JSON document in its metadata), told apart without reading it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return META_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001  (not readable as ours: let the foreign-checkpoint reader explain)
        return False


def ldm_file_of(path: str | Path) -> Path:
    """The LDM file of a run directory, or `path` itself; a clear error when there is none."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        if not (path / LDM_FILE).exists():
            raise CheckpointError(f"{path} holds no {LDM_FILE}: is it a finished ldmkit training run?")
        path = path / LDM_FILE
    return path


def load_ldm(path: str | Path) -> LDMFile:
    """Rebuild the model an ldmkit LDM file (or a run directory's `ldm.safetensors`) describes.

    The file holds every weight, a frozen text encoder's too: nothing else is read. Every part takes the
    file's (memory-mapped) tensors as its own instead of copying them, so the weights are in memory once: a
    copy would add its own pages to the file's, which stay mapped while the UNet uses them. The UNet, the bulk
    of the weights, is built on the meta device; the smaller parts are built for real, keeping buffers that
    no checkpoint holds (CLIP's causal mask), and their random weights are dropped.
    """
    path = ldm_file_of(path)
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != "ldm" or "config" not in meta:
        raise CheckpointError(f"{path} is not an ldmkit latent diffusion checkpoint (kind {meta.get('kind')!r})")
    cfg = from_dict(LDMConfig, meta["config"])
    with torch.device("meta"):
        unet = build_unet(cfg)
    parts = LDMParts(unet, build_autoencoder(cfg), build_conditioner(cfg, pretrained=False), build_schedule(cfg))
    load_strict(parts.unet, split_prefix(tensors, UNET_PREFIX), "UNet", assign=True)
    load_strict(parts.autoencoder, split_prefix(tensors, FIRST_STAGE_PREFIX), "autoencoder", assign=True)
    if parts.conditioner is not None:
        load_strict(parts.conditioner, split_prefix(tensors, COND_STAGE_PREFIX), "conditioner", assign=True)
    return LDMFile(cfg, parts, float(meta["scale_factor"]), tensors)


def load_autoencoder(path: str | Path) -> AnyFirstStage:
    """Load a first stage written by `training.autoencoder.train_autoencoder` (config from the file's metadata)."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") not in ("autoencoder", "autoencoder_kl"):
        raise ValueError(f"{path} is not an ldmkit autoencoder checkpoint (kind {meta.get('kind')!r})")
    cfg = from_dict(AutoencoderConfig, meta["autoencoder"])
    ae = build_first_stage(cfg)
    load_strict(ae, tensors, "autoencoder")
    return ae.eval()
