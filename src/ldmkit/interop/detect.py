"""Tell which model a checkpoint holds from its keys and shapes alone.

Each rule reads facts that the architectures actually differ in: the text encoder's key layout, the
cross-attention context width (`attn2.to_k.weight` [inner, context_dim]), 1x1-conv versus linear
`proj_in` (SD 1 versus SD 2), the UNet's input channels (9 = SD inpainting, 6 = LD super-resolution / semantic
synthesis, 7 = LD inpainting), its base width, and the first stage (`quantize.embedding.weight` = VQ).

Two facts cannot be read from weights. SD 2 "512-base" (eps) and "768-v" (v-prediction) have identical
tensors: we decide by the file name ("768" or "-v" in it means v), say so in the notes, and a caller can
override with `prediction`. Some LD zoo models share one architecture (CelebA-HQ / FFHQ / LSUN-bedrooms,
semantic synthesis 256 / 512): the first is chosen and the others are listed as alternatives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from .compvis import CheckpointParts


@dataclass
class Variant:
    """What a checkpoint is: a preset name to build it from, plus the evidence."""

    name: str  # e.g. "sd-v1", "sd-v2-v", "ldm-cin256-v2", "first-stage vq-f4"
    preset: str | None  # preset of ldmkit/configs (LDMs) or configs/first_stage (autoencoders)
    kind: str  # "ldm" or "first_stage"
    parameterization: str = "eps"
    alternatives: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class UnknownCheckpointError(ValueError):
    """No known architecture matches the checkpoint's keys."""


def _context_dim(unet: dict[str, Tensor]) -> int | None:
    for k, v in unet.items():
        if k.endswith("attn2.to_k.weight"):
            return int(v.shape[1])
    return None


def _first_stage_facts(fs: dict[str, Tensor]) -> tuple[str, int, int]:
    """(kind, downsampling factor f, latent channels) of a first-stage state dict."""
    levels = {int(m.group(1)) for k in fs if (m := re.match(r"encoder\.down\.(\d+)\.", k))}
    f = 2 ** (max(levels) if levels else 0)
    if "quantize.embedding.weight" in fs:
        return "vq", f, int(fs["quantize.embedding.weight"].shape[1])
    if "post_quant_conv.weight" in fs:
        return "kl", f, int(fs["post_quant_conv.weight"].shape[1])
    raise UnknownCheckpointError("first stage without quantize.embedding.weight or post_quant_conv.weight")


def detect_first_stage(fs: dict[str, Tensor]) -> Variant:
    """An autoencoder alone (keys encoder.*, decoder.*, ...): match the LD zoo's first stages."""
    kind, f, c = _first_stage_facts(fs)
    preset = f"{kind}-f{f}"
    notes = [f"{kind.upper()} autoencoder, f = {f}, {c} latent channels"]
    if kind == "vq":
        n = int(fs["quantize.embedding.weight"].shape[0])
        notes.append(f"codebook of {n} entries")
        if f == 8 and n == 256:
            preset = "vq-f8-n256"
        elif f == 4 and not any(".attn." in k or "attn_1" in k for k in fs):
            preset = "vq-f4-noattn"
    return Variant(f"first-stage {preset}", preset, "first_stage", notes=notes)


def detect_variant(parts: CheckpointParts, path: str | Path | None = None, *,
                   first_stage_only: dict[str, Tensor] | None = None) -> Variant:
    """Identify a LatentDiffusion checkpoint (or, with `first_stage_only`, an autoencoder file)."""
    if first_stage_only is not None:
        return detect_first_stage(first_stage_only)
    unet, cs, fs = parts.unet, parts.cond_stage, parts.first_stage
    if "input_blocks.0.0.weight" not in unet:
        raise UnknownCheckpointError(
            "no UNet found (model.diffusion_model.input_blocks.0.0.weight missing); top-level prefixes: "
            + ", ".join(sorted({k.split(".")[0] for k in (*unet, *cs, *fs, *parts.other)})[:8])
        )
    width, in_ch = (int(s) for s in unet["input_blocks.0.0.weight"].shape[:2])
    ctx = _context_dim(unet)
    fs_kind, f, _ = _first_stage_facts(fs) if fs else ("?", 0, 0)
    linear = any(k.endswith("proj_in.weight") and v.ndim == 2 for k, v in unet.items())
    notes = [f"UNet width {width}, {in_ch} input channels, context {ctx}, first stage {fs_kind}-f{f}"]
    name = preset = None
    alternatives: list[str] = []
    param = "eps"
    if "transformer.text_model.embeddings.token_embedding.weight" in cs or (ctx == 768 and not cs and width == 320):
        preset = {4: "sd-v1", 9: "sd-v1-inpainting"}.get(in_ch)
        notes.append("CLIP ViT-L/14 text encoder (SD 1.x)" if cs else "no text encoder weights; context 768 = SD 1.x")
    elif "model.token_embedding.weight" in cs or (ctx == 1024 and linear and width == 320):
        if in_ch == 9:
            preset = "sd-v2-inpainting"
        elif in_ch == 4:
            stem = Path(path).name.lower() if path is not None else ""
            is_v = "768" in stem or re.search(r"(^|[-_])v([-_.]|$)", stem) is not None
            preset, param = ("sd-v2-v", "v") if is_v else ("sd-v2", "eps")
            notes.append(f"SD 2.x: eps and v models have identical weights; chose {param} from the file name "
                         f"{stem!r} ('768' or '-v' means v); pass prediction= to override")
            alternatives = ["sd-v2" if is_v else "sd-v2-v"]
    elif "transformer.token_emb.weight" in cs:
        vocab = int(cs["transformer.token_emb.weight"].shape[0])
        if vocab == 8192:
            preset = "ldm-layout2img-openimages256"
        elif ctx == 1280:
            preset = "ldm-txt2img-1p4B"
        elif ctx == 640:
            preset = "ldm-text2img256"
        notes.append(f"LD BERT embedder, vocabulary {vocab}")
    elif "embedding.weight" in cs:
        preset = {192: "ldm-cin256-v2", 256: "ldm-cin-vq-f8"}.get(width)
        notes.append(f"class embedding of {int(cs['embedding.weight'].shape[0])} rows")
    elif "channel_mapper.weight" in cs:
        preset, alternatives = "ldm-semantic-synthesis256", ["ldm-semantic-synthesis512"]
        notes.append("semantic-map rescaler; 256 and 512 px models share weights' shapes")
    elif not cs:
        if in_ch == 6 and width == 160:
            preset = "ldm-bsr-sr"
        elif in_ch == 7 and width == 256:
            preset = "ldm-inpainting-big"
        elif in_ch == 3 and width == 224:
            preset, alternatives = "ldm-celebahq-vq4", ["ldm-ffhq-vq4", "ldm-lsun-bedrooms-vq4"]
            notes.append("CelebA-HQ, FFHQ and LSUN-bedrooms LDMs share this architecture")
        elif in_ch == 4 and width == 192 and fs_kind == "kl":
            preset = "ldm-lsun-churches-kl8"
    if preset is None:
        raise UnknownCheckpointError("no known model matches: " + "; ".join(notes)
                                     + ". Pass a config (an ldmkit preset or the original YAML).")
    name = preset
    return Variant(name, preset, "ldm", param, alternatives, notes)
