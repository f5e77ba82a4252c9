"""Diffusers ``AutoencoderKL`` export of an ldmkit / CompVis KL autoencoder: config derivation and key renaming.

A pure rename, plus the mid-block attention's 1x1 convs flattened to linears. VQ first stages and settings
diffusers cannot represent exactly are refused with a ValueError naming the setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..models.autoencoder_kl import AutoencoderConfig
from .diffusers_unet import _check_against_diffusers, _diffusers_version, _Renamer

__all__ = ["vae_to_diffusers"]


_AE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_AE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _vae_unsupported(ae: AutoencoderConfig) -> list[str]:
    if ae.kind != "kl":
        return [
            f"the first stage is a {ae.kind.upper()} autoencoder; only the KL AutoencoderKL exports "
            "(diffusers' Stable Diffusion pipelines need one; a VQModel export is not implemented)"
        ]
    problems = []
    if ae.z_channels != ae.embed_dim:
        problems.append(
            f"z_channels {ae.z_channels} != embed_dim {ae.embed_dim} (diffusers ties both to latent_channels)"
        )
    if ae.ch_mult[0] != 1:
        problems.append(f"ch_mult[0]={ae.ch_mult[0]} (diffusers' conv_in width is block_out_channels[0])")
    extra = ae.extra
    if not extra.get("resamp_with_conv", True):
        problems.append("resamp_with_conv=False (diffusers resamples with convs)")
    for flag in ("tanh_out", "give_pre_end", "use_linear_attn"):
        if extra.get(flag):
            problems.append(f"{flag}=True")
    return problems


def vae_to_diffusers(
    ae_cfg: AutoencoderConfig,
    state: Mapping[str, Tensor],
    *,
    scaling_factor: float = 0.18215,
    sample_size: int | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(``AutoencoderKL`` config, its state dict) from an ldmkit / CompVis ``AutoencoderKL`` state dict.

    ``scaling_factor`` is the latent scale (SD: 0.18215); ``sample_size`` the nominal image size (default: the
    config's ``resolution``). Raises ValueError for VQ first stages and settings diffusers cannot represent.
    """
    problems = _vae_unsupported(ae_cfg)
    if problems:
        raise ValueError("cannot export this autoencoder to diffusers: " + "; ".join(problems))
    levels = len(ae_cfg.ch_mult)
    attn = ae_cfg.attn_type == "vanilla"
    level_attn = [attn and (ae_cfg.resolution // 2**i) in ae_cfg.attn_resolutions for i in range(levels)]
    n = ae_cfg.num_res_blocks

    r = _Renamer("autoencoder")
    resnet_keys: list[tuple[str, str]] = []  # (ours, theirs) resnet prefixes
    attn_keys: list[tuple[str, str]] = []
    for side in ("encoder", "decoder"):
        r.add(f"{side}.conv_in", f"{side}.conv_in")
        r.add(f"{side}.conv_out", f"{side}.conv_out")
        r.add(f"{side}.norm_out", f"{side}.conv_norm_out")
        resnet_keys += [(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0"),
                        (f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")]
        if attn:
            attn_keys.append((f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0"))
    for i in range(levels):
        for j in range(n):
            resnet_keys.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}"))
            if level_attn[i]:
                attn_keys.append((f"encoder.down.{i}.attn.{j}", f"encoder.down_blocks.{i}.attentions.{j}"))
        if i != levels - 1:
            r.add(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        up = levels - 1 - i  # decoder.up is stored finest first, diffusers' up_blocks coarsest first
        for j in range(n + 1):
            resnet_keys.append((f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}"))
            if level_attn[i]:
                attn_keys.append((f"decoder.up.{i}.attn.{j}", f"decoder.up_blocks.{up}.attentions.{j}"))
        if i != 0:
            r.add(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv")
    for ours, theirs in resnet_keys:
        for a, b in _AE_RESNET.items():
            if a != "nin_shortcut" or any(k.startswith(f"{ours}.{a}.") for k in state):
                r.add(f"{ours}.{a}", f"{theirs}.{b}")
    for ours, theirs in attn_keys:
        for a, b in _AE_ATTN.items():
            r.add(f"{ours}.{a}", f"{theirs}.{b}")
    r.add("quant_conv", "quant_conv")
    r.add("post_quant_conv", "post_quant_conv")
    new_state = r.apply(state)
    # The attention's 1x1 convs [C, C, 1, 1] become linears [C, C].
    for theirs in (t for _, t in attn_keys):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            key = f"{theirs}.{proj}.weight"
            w = new_state[key]
            if w.ndim != 4 or w.shape[2:] != (1, 1):
                raise ValueError(f"{key}: expected a 1x1 conv weight [C, C, 1, 1], got {tuple(w.shape)}")
            new_state[key] = w[:, :, 0, 0]

    widths = [ae_cfg.ch * m for m in ae_cfg.ch_mult]
    config: dict[str, Any] = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": _diffusers_version(),
        "in_channels": ae_cfg.in_channels,
        "out_channels": ae_cfg.out_ch,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in level_attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(level_attn)],
        "block_out_channels": widths,
        "layers_per_block": n,
        "act_fn": "silu",
        "latent_channels": ae_cfg.embed_dim,
        "norm_num_groups": 32,
        "sample_size": sample_size if sample_size is not None else ae_cfg.resolution,
        "scaling_factor": float(scaling_factor),
        "force_upcast": True,
        "mid_block_add_attention": attn,
    }
    _check_against_diffusers("AutoencoderKL", config, new_state)
    return config, new_state
