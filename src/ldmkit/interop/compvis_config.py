"""Translate an original CompVis / Stability YAML (`model: {target, params}`) into ldmkit configs.

The reference builds objects from import strings (`target`); we read the same document as data and map each
known target onto a typed config. Unknown targets or parameters are errors that name them: a silently
dropped option would build a different network than the one the checkpoint was trained as.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..config import (
    ConditioningConfig,
    DataConfig,
    LDMConfig,
    SamplingConfig,
    ScheduleConfig,
)
from ..models.autoencoder_kl import AutoencoderConfig
from ..models.unet import UNetConfig

LDM_TARGETS = ("LatentDiffusion", "LatentInpaintDiffusion")
KL_TARGETS = ("AutoencoderKL",)
VQ_TARGETS = ("VQModel", "VQModelInterface")
# LatentDiffusion / DDPM parameters that change nothing about the networks or the sampling maths
IGNORED_LDM_PARAMS = {
    "base_learning_rate", "monitor", "log_every_t", "first_stage_key", "cond_stage_key", "cond_stage_trainable",
    "num_timesteps_cond", "scheduler_config", "loss_type", "ckpt_path", "ignore_keys", "load_only_unet",
    "cond_stage_forward", "original_elbo_weight", "l_simple_weight", "v_posterior", "learn_logvar",
    "logvar_init", "use_positional_encodings", "clip_denoised", "given_betas", "cosine_s", "make_it_fit",
    "reset_ema", "reset_num_ema_updates", "concat_keys", "masked_image_key", "finetune_keys", "keep_finetune_dims",
    "personalization_config", "unfreeze_model", "model_lr", "image_size", "channels", "scale_by_std",
}  # fmt: skip
IGNORED_FIRST_STAGE_PARAMS = {"monitor", "lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels",
                              "remap", "sane_index_shape", "batch_resize_range", "scheduler_config", "lr_g_factor",
                              "use_ema"}  # fmt: skip


class ConfigTranslationError(ValueError):
    """The YAML describes something ldmkit cannot build faithfully."""


def _target(node: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(node, dict) or "target" not in node:
        raise ConfigTranslationError(f"{where}: expected a mapping with 'target' and 'params'")
    params = node.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigTranslationError(f"{where}.params: expected a mapping")
    return str(node["target"]).rsplit(".", 1)[-1], params


def autoencoder_config_from_compvis(node: dict[str, Any], where: str = "first_stage_config") -> AutoencoderConfig:
    """`{target: ...AutoencoderKL | VQModel | VQModelInterface, params: {ddconfig, embed_dim, n_embed?}}`."""
    name, params = _target(node, where)
    unknown = set(params) - {"ddconfig", "embed_dim", "n_embed"} - IGNORED_FIRST_STAGE_PARAMS
    if unknown:
        raise ConfigTranslationError(f"{where}: unsupported parameter(s) {sorted(unknown)} of {name}")
    if "ddconfig" not in params or "embed_dim" not in params:
        raise ConfigTranslationError(f"{where}: {name} needs ddconfig and embed_dim")
    dd = dict(params["ddconfig"])
    try:
        if name in KL_TARGETS:
            return AutoencoderConfig.from_ddconfig(dd, int(params["embed_dim"]))
        if name in VQ_TARGETS:
            return AutoencoderConfig.from_ddconfig(dd, int(params["embed_dim"]), kind="vq",
                                                   n_embed=int(params.get("n_embed", 0)) or None)
    except (TypeError, ValueError) as e:
        raise ConfigTranslationError(f"{where}: {e}") from None
    raise ConfigTranslationError(f"{where}: unsupported first stage target {node['target']!r}")


def conditioning_from_compvis(node: Any, key: str | None, concat_mode: bool) -> ConditioningConfig:
    """The cond stage plus LDM's conditioning_key rule: None -> 'concat' if concat_mode else 'crossattn'."""
    if node == "__is_unconditional__" or node is None:
        return ConditioningConfig(kind="none")
    resolved = key if key is not None else ("concat" if concat_mode else "crossattn")
    if node == "__is_first_stage__":
        return ConditioningConfig(kind="first_stage", key=resolved)
    name, p = _target(node, "cond_stage_config")

    def allowed(*names: str) -> None:
        extra = set(p) - set(names) - {"key", "device", "freeze"}
        if extra:
            raise ConfigTranslationError(f"cond_stage_config: unsupported parameter(s) {sorted(extra)} of {name}")

    if name == "ClassEmbedder":
        allowed("n_classes", "embed_dim", "ucg_rate")
        rows = int(p.get("n_classes", 1000))
        # cin256-v2 has 1001 rows, the last being the "no class" label of LD's guidance notebook
        n, null = (1000, True) if rows == 1001 else (rows, False)
        return ConditioningConfig(kind="class", key=resolved, n_classes=n, null_class=null,
                                  embed_dim=int(p.get("embed_dim", 512)))
    if name == "BERTEmbedder":
        allowed("n_embed", "n_layer", "vocab_size", "max_seq_len", "use_tokenizer", "embedding_dropout")
        return ConditioningConfig(kind="bert", key=resolved, embed_dim=int(p["n_embed"]), n_layer=int(p["n_layer"]),
                                  vocab_size=int(p.get("vocab_size", 30522)), max_seq_len=int(p.get("max_seq_len", 77)),
                                  use_tokenizer=bool(p.get("use_tokenizer", True)))
    if name == "FrozenCLIPEmbedder":
        allowed("version", "max_length", "layer", "layer_idx")
        if p.get("layer", "last") not in ("last", "hidden") or p.get("layer_idx") not in (None, -1):
            raise ConfigTranslationError("FrozenCLIPEmbedder: only layer 'last' is supported here")
        return ConditioningConfig(kind="clip", key=resolved, layer="last")
    if name == "FrozenOpenCLIPEmbedder":
        allowed("arch", "version", "max_length", "layer")
        if p.get("arch", "ViT-H-14") != "ViT-H-14":
            raise ConfigTranslationError(f"FrozenOpenCLIPEmbedder: only arch ViT-H-14 is supported, got {p['arch']!r}")
        return ConditioningConfig(kind="openclip", key=resolved, layer=str(p.get("layer", "last")))
    if name == "Identity":
        return ConditioningConfig(kind="image", key=resolved)
    if name == "SpatialRescaler":
        allowed("n_stages", "in_channels", "out_channels", "multiplier", "method", "bias")
        if p.get("method", "bilinear") != "bilinear" or p.get("multiplier", 0.5) != 0.5 or p.get("bias", False):
            raise ConfigTranslationError("SpatialRescaler: only method bilinear, multiplier 0.5, bias False are "
                                         "supported")
        return ConditioningConfig(kind="rescaler", key=resolved, n_stages=int(p.get("n_stages", 1)),
                                  in_channels=int(p.get("in_channels", 3)), out_channels=int(p["out_channels"]))
    raise ConfigTranslationError(f"unsupported cond stage target {node['target']!r}")


def ldm_config_from_compvis(doc: dict[str, Any]) -> LDMConfig:
    """A LatentDiffusion YAML (the whole document or its `model` section) -> LDMConfig."""
    model = doc.get("model", doc) if isinstance(doc, dict) else doc
    name, p = _target(model, "model")
    if name not in LDM_TARGETS:
        raise ConfigTranslationError(
            f"model: unsupported target {model['target']!r} (supported: {', '.join(LDM_TARGETS)})"
        )
    known = {"linear_start", "linear_end", "timesteps", "beta_schedule", "parameterization", "scale_factor",
             "use_ema", "conditioning_key", "concat_mode", "unet_config", "first_stage_config", "cond_stage_config"}
    unknown = set(p) - known - IGNORED_LDM_PARAMS
    if unknown:
        raise ConfigTranslationError(f"model.params: unsupported parameter(s) {sorted(unknown)}")
    for req in ("unet_config", "first_stage_config"):
        if req not in p:
            raise ConfigTranslationError(f"model.params: {req} is required")
    _, unet_params = _target(p["unet_config"], "unet_config")
    # use_fp16 / use_bf16 say which precision the reference ran in on its GPUs; here precision is chosen
    # when a model is loaded (float32 on CPU), so the translated config keeps float32.
    unet_params = {k: v for k, v in unet_params.items() if k not in ("use_fp16", "use_bf16")}
    try:
        unet = UNetConfig(**unet_params)
    except TypeError as e:
        raise ConfigTranslationError(f"unet_config.params: {e}") from None
    ae = autoencoder_config_from_compvis(p["first_stage_config"])
    cond = conditioning_from_compvis(p.get("cond_stage_config"), p.get("conditioning_key"),
                                     bool(p.get("concat_mode", True)))
    if name == "LatentInpaintDiffusion" and cond.resolved_key() != "hybrid":
        raise ConfigTranslationError("LatentInpaintDiffusion expects conditioning_key 'hybrid'")
    schedule = ScheduleConfig(kind=str(p.get("beta_schedule", "linear")),
                              num_timesteps=int(p.get("timesteps", 1000)),
                              linear_start=float(p.get("linear_start", 1e-4)),
                              linear_end=float(p.get("linear_end", 2e-2)))
    f = 2 ** (len(ae.ch_mult) - 1)
    latent_size = int(p.get("image_size", unet.image_size or 32))
    text = cond.kind in ("clip", "openclip") or (cond.kind == "bert" and cond.use_tokenizer)
    sampling = SamplingConfig(sampler="ddim", steps=50, eta=0.0 if text else 1.0,
                              guidance=7.5 if text else (3.0 if cond.kind == "class" and cond.null_class else 1.0))
    return LDMConfig(
        autoencoder=ae, unet=unet, schedule=schedule, conditioning=cond,
        data=DataConfig(name="folder", resolution=latent_size * f, channels=ae.in_channels),
        sampling=sampling, parameterization=str(p.get("parameterization", "eps")),
        scale_factor=float(p.get("scale_factor", 1.0)), checkpoint_ema=bool(p.get("use_ema", True)),
    )


def read_compvis_yaml(path: str | Path) -> LDMConfig | AutoencoderConfig:
    """Read an original YAML file: a LatentDiffusion config gives an LDMConfig, a first stage an AutoencoderConfig."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigTranslationError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigTranslationError(f"{path} is not valid YAML: {e}") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict):
        raise ConfigTranslationError(f"{path}: no 'model' section with a target")
    name, _ = _target(model, "model")
    if name in KL_TARGETS + VQ_TARGETS:
        return autoencoder_config_from_compvis(model, "model")
    return ldm_config_from_compvis(model)
