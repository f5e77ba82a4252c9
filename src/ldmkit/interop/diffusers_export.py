"""Export a latent diffusion model as a diffusers folder (``StableDiffusionPipeline`` layout), offline.

    export_to_diffusers("runs/sd-finetune", "out/sd-diffusers")          # an ldmkit run dir / ldm.safetensors
    export_to_diffusers("v1-5-pruned-emaonly.safetensors", "out/sd15")    # an original CompVis / Stability file

writes ``model_index.json`` and the component folders ``unet/`` (``UNet2DConditionModel``), ``vae/``
(``AutoencoderKL``), ``scheduler/`` (``DDIMScheduler``), ``text_encoder/`` (transformers ``CLIPTextModel``) and
``tokenizer/`` (transformers ``CLIPTokenizer`` files). Weights are written as safetensors. Nothing here imports
diffusers or transformers except to double-check names when they are installed.

The conversions are pure renames (plus the VAE attention's 1x1 convs flattened to linears and OpenCLIP's fused
q/k/v split in three), so the exported networks compute the same functions. Configurations that diffusers
cannot represent exactly are refused with a ValueError naming the setting, rather than exported approximately.

What is exported, by conditioning kind:
  * "clip" (SD 1.x) / "openclip" (SD 2.x), cross-attention: the full ``StableDiffusionPipeline``; with
    ``key: hybrid`` and a 2 * latent + 1 channel UNet input, ``StableDiffusionInpaintPipeline``.
  * anything else (class labels, BERT text, images, semantic maps, unconditional): ``unet/``, ``vae/`` and
    ``scheduler/`` only, without ``model_index.json`` (no diffusers pipeline takes these conditions with a
    ``UNet2DConditionModel``); load each with ``<Class>.from_pretrained(folder / name)``. A "class" model also
    gets ``class_embeddings.safetensors``: the context for label ``y`` is ``weight[y][:, None, :]`` (row
    ``n_classes`` is the null class used for classifier-free guidance). The notes of the returned report say so.
  * VQ first stages and UNets with ADM ``AttentionBlock`` self-attention (no ``SpatialTransformer``) are refused.

The per-component converters live in `diffusers_unet` (``unet_to_diffusers``), `diffusers_vae`
(``vae_to_diffusers``) and `diffusers_text` (``text_encoder_to_diffusers``, ``tokenizer_files``) and are
re-exported here; this module adds the scheduler config and writes the folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import LDMConfig
from .diffusers_text import text_encoder_to_diffusers, tokenizer_files
from .diffusers_unet import _diffusers_version, unet_to_diffusers
from .diffusers_vae import vae_to_diffusers

__all__ = [
    "DiffusersExport",
    "export_diffusers",
    "export_parts_to_diffusers",
    "export_to_diffusers",
    "scheduler_config",
    "text_encoder_to_diffusers",
    "tokenizer_files",
    "unet_to_diffusers",
    "vae_to_diffusers",
]

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "model.safetensors"
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# Every component folder / file this module writes into out_dir (what overwrite=True replaces).
_OWNED = ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "model_index.json", "class_embeddings.safetensors")


# ----------------------------------------------------------------------------------------------------------
# Scheduler


def scheduler_config(cfg: LDMConfig) -> dict[str, Any]:
    """``DDIMScheduler`` config with the model's training schedule and prediction type.

    LDM's "linear" schedule (linear in sqrt(beta), squared) is diffusers' "scaled_linear"; LDM's "sqrt_linear"
    is diffusers' "linear"; other schedules are written out as ``trained_betas``. ``steps_offset`` 1 with
    "leading" spacing gives the timesteps of LDM's DDIM sampler ("uniform": 1, 21, ..., 981 for 50 steps).
    """
    from ..ldm.build import build_schedule

    s = cfg.schedule
    if cfg.parameterization not in PREDICTION_TYPES:
        raise ValueError(f"unknown parameterization {cfg.parameterization!r}; expected one of {list(PREDICTION_TYPES)}")
    named = {"linear": "scaled_linear", "scaled_linear": "scaled_linear", "sqrt_linear": "linear",
             "true_linear": "linear"}
    config: dict[str, Any] = {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": _diffusers_version(),
        "num_train_timesteps": s.num_timesteps,
        "beta_start": s.linear_start,
        "beta_end": s.linear_end,
        "beta_schedule": named.get(s.kind, "linear"),
        "trained_betas": None,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": PREDICTION_TYPES[cfg.parameterization],
        "thresholding": False,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    if s.kind not in named:
        config["trained_betas"] = [float(b) for b in build_schedule(cfg).betas.tolist()]
    return config


# ----------------------------------------------------------------------------------------------------------
# Whole models


@dataclass
class DiffusersExport:
    """What `export_parts_to_diffusers` wrote."""

    out_dir: Path
    components: list[str]
    pipeline: str | None  # model_index.json's _class_name, or None when no model_index.json was written
    notes: list[str] = field(default_factory=list)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _write_weights(path: Path, state: Mapping[str, Tensor], dtype: torch.dtype | None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        v = v.contiguous()
        if v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()  # a view into a larger tensor (e.g. a q/k/v slice): safetensors refuses shared storage
        clean[k] = v
    save_file(clean, str(path), metadata={"format": "pt"})


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"{out_dir} is not empty; choose a new folder or pass overwrite=True")
        for name in _OWNED:
            p = out_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def export_parts_to_diffusers(
    cfg: LDMConfig,
    parts: Any,
    out_dir: str | Path,
    *,
    scale_factor: float,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    bpe_vocab: str | Path | None = None,
) -> DiffusersExport:
    """Write in-memory model parts (`LDMParts`: unet, autoencoder, conditioner) as a diffusers folder.

    Everything is converted (and refused) before anything is written. ``dtype`` casts floating weights
    (e.g. ``torch.float16``); ``bpe_vocab`` is the CLIP BPE vocabulary for ``tokenizer/``.
    """
    from ..models.autoencoder_kl import AutoencoderKL

    out_dir = Path(out_dir)
    notes: list[str] = []
    if not isinstance(parts.autoencoder, AutoencoderKL):
        raise ValueError(
            "cannot export to diffusers: the first stage is a VQ autoencoder; only KL first stages (AutoencoderKL) "
            "export (a VQModel conversion is not implemented)"
        )
    f = 2 ** (len(cfg.autoencoder.ch_mult) - 1)
    resolution = cfg.data.resolution
    vae_config, vae_state = vae_to_diffusers(
        cfg.autoencoder, parts.autoencoder.state_dict(), scaling_factor=scale_factor, sample_size=resolution
    )
    unet_config, unet_state = unet_to_diffusers(
        cfg.unet, parts.unet.state_dict(), sample_size=resolution // f if resolution % f == 0 else None
    )
    sched = scheduler_config(cfg)

    cond = cfg.conditioning
    key = cond.resolved_key()
    text = None
    pipeline: str | None = None
    if cond.kind in ("clip", "openclip"):
        if parts.conditioner is None:
            raise ValueError(f"a {cond.kind!r} model without its text encoder weights cannot be exported")
        te_config, te_state, pad = text_encoder_to_diffusers(parts.conditioner)
        text = (te_config, te_state, tokenizer_files(pad, bpe_vocab=bpe_vocab))
        latent = cfg.autoencoder.embed_dim
        if key == "crossattn" and cfg.unet.in_channels == latent:
            pipeline = "StableDiffusionPipeline"
        elif key == "hybrid" and cfg.unet.in_channels == 2 * latent + 1:
            pipeline = "StableDiffusionInpaintPipeline"
            notes.append("inpainting model: the UNet input is [noisy latent, mask, masked-image latent], the "
                         "order diffusers' StableDiffusionInpaintPipeline concatenates")
        else:
            notes.append(f"text model with conditioning key {key!r} and a {cfg.unet.in_channels}-channel UNet input: "
                         "no diffusers pipeline matches, so no model_index.json was written")
    else:
        what = {"none": "unconditional", "class": "class-conditional"}.get(cond.kind, f"{cond.kind!r}-conditioned")
        notes.append(f"{what} model: diffusers has no UNet2DConditionModel pipeline for it, so only unet/, vae/ "
                     "and scheduler/ were written (no model_index.json); load them one by one")
        if cond.kind == "class" and parts.conditioner is not None:
            notes.append("class_embeddings.safetensors holds the class table 'weight' [n_classes (+1 null), dim]: "
                         "pass weight[labels][:, None, :] as encoder_hidden_states")
        elif parts.conditioner is not None:
            notes.append(f"the {cond.kind!r} cond stage has no diffusers equivalent here and was not exported")

    _prepare_out_dir(out_dir, overwrite)
    _write_json(out_dir / "unet" / "config.json", unet_config)
    _write_weights(out_dir / "unet" / DIFFUSERS_WEIGHTS, unet_state, dtype)
    _write_json(out_dir / "vae" / "config.json", vae_config)
    _write_weights(out_dir / "vae" / DIFFUSERS_WEIGHTS, vae_state, dtype)
    _write_json(out_dir / "scheduler" / "scheduler_config.json", sched)
    components = ["unet", "vae", "scheduler"]
    if text is not None:
        te_config, te_state, tok_files = text
        if dtype is not None:
            te_config = {**te_config, "torch_dtype": str(dtype).removeprefix("torch.")}
        _write_json(out_dir / "text_encoder" / "config.json", te_config)
        _write_weights(out_dir / "text_encoder" / TEXT_WEIGHTS, te_state, dtype)
        (out_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
        for name, content in tok_files.items():
            (out_dir / "tokenizer" / name).write_text(content, encoding="utf-8")
        components += ["text_encoder", "tokenizer"]
    elif cond.kind == "class" and parts.conditioner is not None:
        _write_weights(out_dir / "class_embeddings.safetensors",
                       {"weight": parts.conditioner.embedding.weight}, dtype)
        components.append("class_embeddings.safetensors")
    if pipeline is not None:
        _write_json(out_dir / "model_index.json", {
            "_class_name": pipeline,
            "_diffusers_version": _diffusers_version(),
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })
        components.append("model_index.json")
    return DiffusersExport(out_dir, components, pipeline, notes)


def _load_source(
    source: Path, use_ema: bool, config: Any, prediction: str | None
) -> tuple[LDMConfig, Any, float | None]:
    """(config, LDMParts, scale factor) of an ldmkit run dir / ldm.safetensors or an original checkpoint."""
    from ..ldm.files import is_ldmkit_file, load_ldm

    if not source.exists():
        raise FileNotFoundError(f"no such model: {source}")
    if source.is_dir() or (source.suffix == ".safetensors" and is_ldmkit_file(source)):
        if config is not None:
            raise ValueError("config applies to original checkpoints only; an ldmkit checkpoint carries its own")
        f = load_ldm(source)
        if use_ema:
            from ..ldm.build import load_strict
            from .compvis import ema_unet_state, split_checkpoint

            split = split_checkpoint(f.tensors)
            if not split.has_ema:
                raise ValueError(f"{source} has no EMA weights (no model_ema.* keys); export without use_ema")
            load_strict(f.parts.unet, ema_unet_state(split, f.parts.unet), "EMA UNet")
        if prediction is not None:
            f.config.parameterization = prediction  # checked by scheduler_config
        return f.config, f.parts, f.scale_factor
    from .loader import load_ldm_checkpoint

    loaded = load_ldm_checkpoint(source, config=config, use_ema=use_ema, prediction=prediction)
    return loaded.config, loaded.parts, loaded.config.scale_factor


def export_diffusers(
    source: str | Path,
    out_dir: str | Path,
    *,
    use_ema: bool = False,
    config: Any = None,
    prediction: str | None = None,
    scale_factor: float | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    bpe_vocab: str | Path | None = None,
) -> DiffusersExport:
    """`export_to_diffusers` returning the full report (components written, pipeline class, notes).

    ``config`` (original checkpoints only: preset name, ldmkit YAML, original YAML or LDMConfig; default: detect
    from the keys) and ``prediction`` ("eps", "v", "x0": overrides what the UNet predicts, e.g. SD 2.x 768-v)
    are passed to `load_ldm_checkpoint`. ``scale_factor`` overrides the recorded latent scale.
    """
    cfg, parts, stored_scale = _load_source(Path(source), use_ema, config, prediction)
    scale = scale_factor if scale_factor is not None else stored_scale
    if scale is None:
        raise ValueError(
            f"{source} records no latent scale factor (config scale_factor is null); pass scale_factor explicitly"
        )
    return export_parts_to_diffusers(cfg, parts, out_dir, scale_factor=scale, dtype=dtype, overwrite=overwrite,
                                     bpe_vocab=bpe_vocab)


def export_to_diffusers(source: str | Path, out_dir: str | Path, *, use_ema: bool = False, **kwargs: Any) -> Path:
    """Convert ``source`` (ldmkit run dir, ``ldm.safetensors``, or an original ``.ckpt`` / ``.safetensors``) to a
    diffusers folder at ``out_dir``; returns ``out_dir``. See `export_diffusers` for the keyword options."""
    return export_diffusers(source, out_dir, use_ema=use_ema, **kwargs).out_dir
