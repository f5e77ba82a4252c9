"""What a user conditions a sample on, checked and turned into the denoiser's keyword tensors.

`SampleInputs` holds one request: class labels, prompts, layouts, semantic maps, low-resolution images,
an image with a mask (inpainting) or an image with a strength (img2img). `build_request` validates it
against the model (each bad input gets a ValueError naming it) and returns the conditional and
unconditional keyword tensors for classifier-free guidance, the latent size to sample, and what the sampler
needs for mask-based inpainting or img2img. The same functions that built the training conditions
(`training.conditions`) build these, so a model is sampled with what it learnt from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import LDMConfig
from .diffusion.noise import Generators
from .latent import LatentCodec
from .ldm.concat import inpaint_concat, lowres_concat

Layout = Sequence[tuple[int, float, float, float, float]]


@dataclass
class SampleInputs:
    """One sampling request; every per-example field has one entry per sample."""

    classes: Sequence[int] | None = None
    prompts: Sequence[str] | None = None
    negative_prompt: str = ""
    layouts: Sequence[Layout] | None = None
    segmap: Tensor | None = None  # [B, H, W] integer class maps
    lowres: Tensor | None = None  # [B, C, h, w] in [-1, 1]
    image: Tensor | None = None  # [B, C, H, W] in [-1, 1]: inpainting (with mask) or img2img (with strength)
    mask: Tensor | None = None  # [B, 1, H, W] in {0, 1}, 1 = the hole to fill
    strength: float | None = None  # img2img: share of the sampling steps run from the noised image
    n: int | None = None  # unconditional: how many

    def count(self) -> int:
        """The number of samples the request asks for (its per-example inputs must agree)."""
        sizes = {name: len(v) for name, v in self.per_example().items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the inputs disagree on the number of samples: {sizes}")
        if sizes:
            count = next(iter(sizes.values()))
            if self.n is not None and self.n != count:
                raise ValueError(f"n={self.n} but the inputs give {count} samples")
        else:
            count = self.n or 0
        if count < 1:
            raise ValueError("nothing to sample: give classes, prompts, layouts, a segmap, a low-res image, "
                             "an image, or n >= 1")
        return count

    def per_example(self) -> dict[str, Any]:
        names = ("classes", "prompts", "layouts", "segmap", "lowres", "image", "mask")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def to(self, device: torch.device) -> SampleInputs:
        """The request with its tensors on `device` (where the autoencoder encodes them)."""
        moved = {k: v.to(device) for k, v in self.__dict__.items() if isinstance(v, Tensor)}
        return SampleInputs(**{**self.__dict__, **moved})

    def slice(self, start: int, stop: int) -> SampleInputs:
        """The requests for samples start..stop-1 (batching a large request)."""
        out = SampleInputs(**{**self.__dict__, **{k: v[start:stop] for k, v in self.per_example().items()}})
        if not self.per_example():
            out.n = min(stop, self.count()) - start
        return out


@dataclass
class Request:
    """A validated request: what the guided denoiser is bound to and how the sampler runs."""

    count: int
    latent_hw: tuple[int, int]
    cond: dict[str, Tensor]
    uncond: dict[str, Tensor] | None  # None: the model has no unconditional branch (guidance must be 1)
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)  # mask / x0 (inpainting), init / strength
    paste: tuple[Tensor, Tensor] | None = None  # (image, mask): keep the known pixels in the result
    no_guidance: str | None = None  # why guidance != 1 is refused (the model learnt no unconditional branch)

    def to(self, device: torch.device) -> Request:
        """The request with every condition tensor on `device` (labels and tokens are built on the CPU)."""
        def move(d: dict[str, Any] | None) -> dict[str, Any] | None:
            return None if d is None else {k: v.to(device) if isinstance(v, Tensor) else v for k, v in d.items()}

        paste = None if self.paste is None else (self.paste[0].to(device), self.paste[1].to(device))
        return Request(self.count, self.latent_hw, move(self.cond) or {}, move(self.uncond),
                       move(self.sampler_kwargs) or {}, paste, self.no_guidance)


@dataclass(frozen=True)
class ConditionRoles:
    """What a model's condition takes from a user: prompts, layouts, and an inpainting input."""

    text: bool  # prompts (CLIP, OpenCLIP, MiniLM, or LD's BERT with its tokenizer)
    layout: bool  # (class, box) lists (LD's layout model: BERT without a tokenizer)
    concat_inpaint: bool  # the masked image is concatenated (LD's inpainting model, SD inpainting)


def condition_roles(cfg: LDMConfig) -> ConditionRoles:
    c = cfg.conditioning
    text = c.kind in ("clip", "openclip", "minilm") or (c.kind == "bert" and c.use_tokenizer)
    layout = c.kind == "layout" or (c.kind == "bert" and not c.use_tokenizer)
    concat = c.kind == "first_stage" or (c.resolved_key() == "hybrid" and text)
    return ConditionRoles(text, layout, concat)


def _image_batch(x: Tensor, what: str, channels: int) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{what} must be a float tensor in [-1, 1]")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} must be [B, {channels}, H, W] (this model has {channels} image channels), "
                         f"got {tuple(x.shape)}")
    if not torch.isfinite(x).all() or x.min() < -1.01 or x.max() > 1.01:
        raise ValueError(f"{what} must hold finite values in [-1, 1], got range [{float(x.min()):.3g}, "
                         f"{float(x.max()):.3g}]")
    return x.float().clamp(-1, 1)


def _mask_batch(mask: Tensor, image: Tensor) -> Tensor:
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None] if mask.shape[0] == image.shape[0] and mask.shape[0] != 1 else mask[None]
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask must be [B, 1, H, W] with the image's size {tuple(image.shape[-2:])}, "
                         f"got {tuple(mask.shape)}")
    if mask.shape[0] == 1 and image.shape[0] > 1:
        mask = mask.expand(image.shape[0], -1, -1, -1)
    mask = (mask.float() > 0.5).float()
    if not mask.any():
        raise ValueError("the mask is empty: mark the region to fill with 1 (white)")
    return mask


def _side(size: int, f: int, what: str) -> int:
    if size % f:
        raise ValueError(f"{what} size {size} is not divisible by the autoencoder's downsampling factor {f}")
    return size // f


def build_request(cfg: LDMConfig, codec: LatentCodec, inputs: SampleInputs, *,
                  resolution: int | tuple[int, int] | None, encode_prompts: Callable[[Sequence[str]], Tensor],
                  generator: Generators) -> Request:
    """Check `inputs` against the model and assemble the guided-denoiser conditions (see module doc)."""
    c = cfg.conditioning
    kind, key = c.kind, c.resolved_key()
    count = inputs.count()
    f = codec.downsample_factor
    res = cfg.data.resolution if resolution is None else resolution
    channels = cfg.autoencoder.in_channels
    cond: dict[str, Tensor] = {}
    uncond: dict[str, Tensor] | None = {}
    no_guidance = None
    unguided = (f"this model ({kind!r} conditioning) learnt no unconditional branch (its spatial condition is never "
                "dropped in training), so classifier-free guidance is not available: use guidance 1")
    height, width = (res, res) if isinstance(res, int) else res  # an int is a square
    hw = (_side(int(height), f, "resolution"), _side(int(width), f, "resolution"))
    roles = condition_roles(cfg)
    text_model, layout_model = roles.text, roles.layout
    given = {k for k, v in inputs.per_example().items()}

    def refuse(name: str, why: str) -> None:
        if name in given:
            what = {"classes": "class labels", "segmap": "segmap (semantic map)", "lowres": "low-res image"}
            raise ValueError(f"this model ({kind!r} conditioning) takes no {what.get(name, name)}: {why}")

    # cross-attention conditions
    if kind == "class":
        refuse("prompts", "it is class-conditional")
        n_cls = c.n_classes
        if inputs.classes is not None:
            bad = [k for k in inputs.classes if not 0 <= int(k) < n_cls]
            if bad:
                raise ValueError(f"class {bad[0]} is out of range: this model knows classes 0..{n_cls - 1}")
            y = torch.tensor([int(k) for k in inputs.classes], dtype=torch.long)
        elif c.null_class:
            y = torch.full((count,), n_cls, dtype=torch.long)
        else:
            raise ValueError("this class-conditional model has no null class: give class labels")
        cond["labels"] = y
        if c.null_class and inputs.classes is not None:
            uncond["labels"] = torch.full_like(y, n_cls)
        else:
            uncond = None
            if not c.null_class:  # e.g. LD's cin-ldm-vq-f8: trained without a "no label" class
                no_guidance = ("this class-conditional model has no null class, so classifier-free guidance "
                               "is not available: use guidance 1")
    elif text_model:
        refuse("classes", "it is a text-to-image model")
        if inputs.prompts is None:
            raise ValueError("this is a text-to-image model: give prompts")
        bad = [p for p in inputs.prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}")
        if any(not p.strip() for p in inputs.prompts):
            raise ValueError("a prompt is empty: describe the image to generate")
        cond["context"] = encode_prompts(list(inputs.prompts))
        uncond["context"] = encode_prompts([inputs.negative_prompt] * count)
    elif layout_model:
        from .ldm.build import layout_tokenizer

        refuse("prompts", "it is a layout-to-image model")
        if inputs.layouts is None:
            raise ValueError("this is a layout-to-image model: give layouts, lists of (class, x0, y0, x1, y1)")
        tok = layout_tokenizer(cfg)
        cond["labels"] = tok.encode([list(map(tuple, lay)) for lay in inputs.layouts])
        uncond["labels"] = tok.null_tokens(count)
    else:
        refuse("classes", "it is not class-conditional")
        refuse("prompts", "it is not a text model")
        refuse("layouts", "it is not a layout model")

    # spatial conditions, concatenated to the latent
    sampler_kwargs: dict[str, Any] = {}
    paste = None
    if kind == "rescaler":
        from .data.canvases import one_hot_segmap

        if inputs.segmap is None:
            raise ValueError("this is a semantic-synthesis model: give a segmap ([B, H, W] class indices)")
        seg = inputs.segmap
        if seg.ndim == 2:
            seg = seg[None]
        if seg.ndim != 3 or seg.dtype.is_floating_point:
            raise ValueError(f"segmap must be an integer tensor [B, H, W], got {tuple(seg.shape)} {seg.dtype}")
        if int(seg.min()) < 0 or int(seg.max()) >= c.in_channels:
            raise ValueError(f"segmap class {int(seg.max()) if int(seg.max()) >= c.in_channels else int(seg.min())} "
                             f"is out of range: this model knows classes 0..{c.in_channels - 1}")
        hw = (_side(seg.shape[1], f, "segmap"), _side(seg.shape[2], f, "segmap"))
        if seg.shape[1] * 0.5 ** c.n_stages != hw[0] or seg.shape[2] * 0.5 ** c.n_stages != hw[1]:
            raise ValueError(f"segmap {tuple(seg.shape[1:])} does not rescale to the latent {hw}")
        cond["labels"] = one_hot_segmap(seg.long(), c.in_channels)
        uncond, no_guidance = None, unguided
    else:
        refuse("segmap", "it is not a semantic-synthesis model")
    if kind == "image":
        if inputs.lowres is None:
            raise ValueError("this is a super-resolution model: give a low-resolution image (lowres)")
        low = _image_batch(inputs.lowres, "lowres", channels)
        size = (low.shape[2] * c.sr_factor, low.shape[3] * c.sr_factor)
        hw = (_side(size[0], f, "output"), _side(size[1], f, "output"))
        cond["concat"] = lowres_concat(low, hw)
        uncond, no_guidance = None, unguided
    else:
        refuse("lowres", "it is not a super-resolution model")
    concat_inpaint = roles.concat_inpaint
    if inputs.image is not None:
        image = _image_batch(inputs.image, "image", channels)
        hw = (_side(image.shape[2], f, "image"), _side(image.shape[3], f, "image"))
        if inputs.mask is not None:
            mask = _mask_batch(inputs.mask, image)
            if concat_inpaint:
                cat = inpaint_concat(codec, image, mask, mask_first=key == "hybrid")
                cond["concat"] = cat
                if key == "hybrid" and uncond is not None:
                    uncond["concat"] = cat
                else:
                    uncond, no_guidance = None, unguided
            else:  # any other model: keep the known latent on its noising path (LDM's DDIM mask / x0)
                z = codec.encode(image, generator)
                keep = 1 - F.interpolate(mask, size=z.shape[-2:], mode="nearest")
                sampler_kwargs.update(mask=keep, x0=z)
            paste = (image, mask)
        elif inputs.strength is not None:
            if concat_inpaint:
                raise ValueError("an inpainting model needs a mask with its image")
            sampler_kwargs.update(init=codec.encode(image, generator), strength=float(inputs.strength))
        else:
            raise ValueError("an image needs a mask (inpainting) or a strength (img2img)")
    else:
        if inputs.mask is not None:
            raise ValueError("a mask needs the image it applies to")
        if concat_inpaint:
            raise ValueError("this is an inpainting model: give an image and a mask (1 = the region to fill)")
    if inputs.strength is not None and "init" not in sampler_kwargs:
        raise ValueError("strength (img2img) needs an image and no mask")
    down = 2 ** (len(cfg.unet.channel_mult) - 1)  # the UNet halves the latent this often
    if hw[0] % down or hw[1] % down:
        raise ValueError(f"the latent {hw[0]} x {hw[1]} is not divisible by the UNet's downsampling {down}: "
                         f"use image sizes that are multiples of {f * down} pixels")
    return Request(count, hw, cond, uncond or None, sampler_kwargs, paste, no_guidance)
