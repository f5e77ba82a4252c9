"""Diffusers ``UNet2DConditionModel`` export of an ldmkit / CompVis ``UNetModel``: config derivation and key renaming.

Also holds the renaming machinery the other diffusers converters share (`diffusers_vae`, `diffusers_text`):
a strict prefix renamer and checks of converted state dicts against meta-device models of the installed
diffusers / transformers. Nothing here imports diffusers except to double-check names when it is installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..ldm.checkpoint import compare_state
from ..models.unet import UNetConfig

__all__ = ["unet_to_diffusers"]

# Written into every config as the version the layout was made for; diffusers only uses it for warnings.
_FALLBACK_DIFFUSERS_VERSION = "0.30.0"


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # not installed: the layout is the same for every version since 0.19
        return _FALLBACK_DIFFUSERS_VERSION


# ----------------------------------------------------------------------------------------------------------
# Renaming machinery: a table of module prefixes (old -> new); every key must fall under exactly one entry.


class _Renamer:
    """Collects ``old prefix -> new prefix`` rules and applies them to a whole state dict, strictly."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.rules: dict[str, str] = {}

    def add(self, old: str, new: str) -> None:
        old, new = old.rstrip(".") + ".", new.rstrip(".") + "."
        if old in self.rules:
            raise RuntimeError(f"internal error: {old} mapped twice")
        self.rules[old] = new

    def apply(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        used: set[str] = set()
        leftovers: list[str] = []
        for key, value in state.items():
            parts = key.split(".")
            for n in range(len(parts) - 1, 0, -1):
                prefix = ".".join(parts[:n]) + "."
                if prefix in self.rules:
                    new_key = self.rules[prefix] + key[len(prefix) :]
                    if new_key in out:
                        raise RuntimeError(f"internal error: two {self.what} keys map to {new_key}")
                    out[new_key] = value
                    used.add(prefix)
                    break
            else:
                leftovers.append(key)
        if leftovers:
            raise ValueError(
                f"{len(leftovers)} {self.what} key(s) have no diffusers equivalent, e.g. {leftovers[:3]}: "
                "the weights do not have the structure their config describes"
            )
        unused = sorted(set(self.rules) - used)
        if unused:
            raise ValueError(
                f"the {self.what} weights lack modules their config implies, e.g. {unused[0]}* "
                f"({len(unused)} in all): the weights do not fit the config"
            )
        return out


def _check_against_diffusers(class_name: str, config: dict[str, Any], state: Mapping[str, Tensor]) -> None:
    """When diffusers is installed, build the model on the meta device and compare key sets and shapes."""
    try:
        import diffusers
    except ImportError:
        return
    cls = getattr(diffusers, class_name)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls(**kwargs)
    _compare_states(f"diffusers {class_name}", model.state_dict(), state)


def _compare_states(what: str, expected: Mapping[str, Tensor], got: Mapping[str, Tensor]) -> None:
    report = compare_state(expected, got, what)
    if not report.ok:
        raise RuntimeError(f"internal error: converted weights do not fit {what}: {report.summary()}")


# ----------------------------------------------------------------------------------------------------------
# UNet


_RESNET_RENAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _add_resnet(renamer: _Renamer, old: str, new: str, state: Mapping[str, Tensor]) -> None:
    for ours, theirs in _RESNET_RENAMES.items():
        if ours == "skip_connection" and not any(k.startswith(f"{old}.{ours}.") for k in state):
            continue  # identity skip: no weights on either side
        renamer.add(f"{old}.{ours}", f"{new}.{theirs}")


def _unet_unsupported(c: UNetConfig) -> list[str]:
    problems = []
    if not c.use_spatial_transformer:
        problems.append(
            "use_spatial_transformer=False: ADM AttentionBlock self-attention has no UNet2DConditionModel "
            "equivalent (diffusers would need a UNet2DModel conversion, which is not implemented)"
        )
    if c.use_scale_shift_norm:
        problems.append("use_scale_shift_norm=True (FiLM ResBlocks; diffusers' cross-attention blocks use 'default')")
    if c.resblock_updown:
        problems.append("resblock_updown=True (resampling ResBlocks; diffusers resamples with convs)")
    if not c.conv_resample:
        problems.append("conv_resample=False (pooling / plain nearest resampling; diffusers uses convs)")
    if c.channel_mult[0] != 1:
        problems.append(f"channel_mult[0]={c.channel_mult[0]} (diffusers' conv_in and time embedding need 1)")
    if c.n_embed is not None:
        problems.append("n_embed (a VQ codebook-logits head)")
    if c.num_attention_blocks is not None:
        problems.append("num_attention_blocks (attention in only some blocks of a level)")
    if c.disable_middle_self_attn:
        problems.append("disable_middle_self_attn=True (UNetMidBlock2DCrossAttn has no only-cross-attention option)")
    if not isinstance(c.context_dim, int | None) and len(set(c.context_dim)) > 1:
        problems.append(f"context_dim per transformer block {list(c.context_dim)} (diffusers has one per level)")
    return problems


def unet_to_diffusers(
    unet_cfg: UNetConfig, state: Mapping[str, Tensor], *, sample_size: int | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(``UNet2DConditionModel`` config, its state dict) from an ldmkit / CompVis ``UNetModel`` state dict.

    ``sample_size`` is the latent size diffusers' pipelines default to (config ``image_size`` when None).
    Raises ValueError for settings diffusers cannot represent exactly, or weights that do not fit the config.
    """
    c = unet_cfg
    problems = _unet_unsupported(c)
    mults = list(c.channel_mult)
    widths = [c.model_channels * m for m in mults]
    heads: list[int] = []
    for level, ch in enumerate(widths):
        n_heads, dim_head = c.attention_heads(ch)
        if n_heads * dim_head != ch:
            problems.append(
                f"level {level}: {n_heads} heads x {dim_head} channels != width {ch} (diffusers needs heads to divide "
                "the width exactly)"
            )
        heads.append(n_heads)
    if problems:
        raise ValueError("cannot export this UNet to diffusers: " + "; ".join(problems))

    levels = len(mults)
    res_blocks = c.res_blocks_per_level
    has_attn = [(2**level) in c.attention_resolutions for level in range(levels)]
    disabled = list(c.disable_self_attentions) if c.disable_self_attentions is not None else [False] * levels
    context_dim = c.context_dim if isinstance(c.context_dim, int) else list(c.context_dim)[0]  # type: ignore[arg-type]

    r = _Renamer("UNet")
    r.add("time_embed.0", "time_embedding.linear_1")
    r.add("time_embed.2", "time_embedding.linear_2")
    class_cfg: dict[str, Any] = {"class_embed_type": None, "num_class_embeds": None}
    if isinstance(c.num_classes, int):
        class_cfg["num_class_embeds"] = c.num_classes
        r.add("label_emb", "class_embedding")
    elif c.num_classes == "continuous":  # Linear(1, 4mc) on the label value
        class_cfg.update(class_embed_type="simple_projection", projection_class_embeddings_input_dim=1)
        r.add("label_emb", "class_embedding")
    elif c.num_classes == "sequential":  # Linear - SiLU - Linear on a vector, diffusers' TimestepEmbedding
        class_cfg.update(class_embed_type="projection", projection_class_embeddings_input_dim=c.adm_in_channels)
        r.add("label_emb.0.0", "class_embedding.linear_1")
        r.add("label_emb.0.2", "class_embedding.linear_2")
    r.add("input_blocks.0.0", "conv_in")
    block = 1
    for level in range(levels):
        for j in range(res_blocks[level]):
            _add_resnet(r, f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", state)
            if has_attn[level]:
                r.add(f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}")
            block += 1
        if level != levels - 1:
            r.add(f"input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            block += 1
    _add_resnet(r, "middle_block.0", "mid_block.resnets.0", state)
    r.add("middle_block.1", "mid_block.attentions.0")
    _add_resnet(r, "middle_block.2", "mid_block.resnets.1", state)
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(res_blocks[level] + 1):
            _add_resnet(r, f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}", state)
            sub = 1
            if has_attn[level]:
                r.add(f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{j}")
                sub = 2
            if level != 0 and j == res_blocks[level]:
                r.add(f"output_blocks.{block}.{sub}.conv", f"up_blocks.{up}.upsamplers.0.conv")
            block += 1
    r.add("out.0", "conv_norm_out")
    r.add("out.2", "conv_out")
    new_state = r.apply(state)

    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": _diffusers_version(),
        "sample_size": sample_size if sample_size is not None else c.image_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": True,  # ldmkit / CompVis embeddings are [cos, sin]
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "only_cross_attention": [bool(d) for d in disabled] if any(disabled) else False,
        "block_out_channels": widths,
        "layers_per_block": res_blocks[0] if len(set(res_blocks)) == 1 else res_blocks,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": c.dropout,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": context_dim,
        "transformer_layers_per_block": c.transformer_depth,
        # diffusers' misnomer: "attention_head_dim" is read as the number of heads (per level)
        "attention_head_dim": heads[0] if len(set(heads)) == 1 and c.num_head_channels == -1 else heads,
        "use_linear_projection": c.use_linear_in_transformer,
        **class_cfg,
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
    }
    _check_against_diffusers("UNet2DConditionModel", config, new_state)
    return config, new_state
