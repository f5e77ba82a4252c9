"""The files a finished run leaves: the inference checkpoint of each stage, and how to write and read them.

An LDM file holds CompVis-prefixed weights (`ldm.build.ldm_state_dict`) with the config and the latent scale
factor in its metadata, so the pipeline rebuilds the model from the file alone. A first-stage file holds the
autoencoder's own state dict and its config.
"""

from __future__ import annotations

from pathlib import Path

from ..config import LDMConfig, from_dict, to_dict
from ..models.autoencoder_kl import AutoencoderConfig
from .build import FirstStage, LDMParts, build_first_stage, ldm_state_dict, load_strict
from .checkpoint import load_checkpoint, save_checkpoint

LDM_FILE = "ldm.safetensors"  # a run's latent diffusion model (EMA weights), what `Pipeline.from_checkpoint` reads
AUTOENCODER_FILE = "autoencoder.safetensors"  # a run's first stage


def save_ldm(path: Path, parts: LDMParts, cfg: LDMConfig, scale_factor: float) -> None:
    """The inference checkpoint: CompVis-prefixed weights, config and scale factor in the metadata."""
    save_checkpoint(path, ldm_state_dict(parts),
                    {"kind": "ldm", "config": to_dict(cfg), "scale_factor": scale_factor})


def load_autoencoder(path: str | Path) -> FirstStage:
    """Load a first stage written by `training.autoencoder.train_autoencoder` (config from the file's metadata)."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") not in ("autoencoder", "autoencoder_kl"):
        raise ValueError(f"{path} is not an ldmkit autoencoder checkpoint (kind {meta.get('kind')!r})")
    cfg = from_dict(AutoencoderConfig, meta["autoencoder"])
    ae = build_first_stage(cfg)
    load_strict(ae, tensors, "autoencoder")
    return ae.eval()
