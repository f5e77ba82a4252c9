"""What a user conditions a sample on, checked and turned into the denoiser's keyword tensors.

`SampleInputs` holds one request: class labels, prompts, layouts, semantic maps, low-resolution images,
an image with a mask (inpainting) or an image with a strength (img2img). `build_request` validates it
against the model (each bad input gets a ValueError naming it) and returns the conditional and
unconditional keyword tensors for classifier-free guidance, the latent size to sample, and what the sampler
needs for mask-based inpainting or img2img. The model's conditioning kind (`conditioning/`) checks and encodes
its own fields with the functions that built its training conditions, so a model is sampled with what it learnt
from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .conditioning import ConditionRoles, kind_of
from .conditioning.base import UNGUIDED, side
from .conditioning.concat import image_batch, inpaint_concat, mask_batch
from .config import LDMConfig
from .diffusion.noise import Generators
from .latent import LatentCodec

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


def condition_roles(cfg: LDMConfig) -> ConditionRoles:
    """What the model's condition takes from a user (prompts, layouts, an inpainting input)."""
    return kind_of(cfg).roles(cfg)


def build_request(cfg: LDMConfig, codec: LatentCodec, inputs: SampleInputs, *,
                  resolution: int | tuple[int, int] | None, encode_prompts: Callable[[Sequence[str]], Tensor],
                  generator: Generators) -> Request:
    """Check `inputs` against the model and assemble the guided-denoiser conditions (see module doc).

    The model's conditioning kind checks and encodes its own fields (classes, prompts, layouts, a segmap, a
    low-res image); an image with a mask or a strength is for every model and handled here."""
    kind = kind_of(cfg)
    key = cfg.conditioning.resolved_key()
    count = inputs.count()
    f = codec.downsample_factor
    res = cfg.data.resolution if resolution is None else resolution
    height, width = (res, res) if isinstance(res, int) else res  # an int is a square
    kind.refuse_others(cfg, set(inputs.per_example()))
    conds = kind.sample(cfg, codec, inputs, count, encode_prompts)
    cond, uncond, no_guidance = conds.cond, conds.uncond, conds.no_guidance
    hw = conds.latent_hw or (side(int(height), f, "resolution"), side(int(width), f, "resolution"))

    sampler_kwargs: dict[str, Any] = {}
    paste = None
    concat_inpaint = kind.roles(cfg).concat_inpaint
    if inputs.image is not None:
        image = image_batch(inputs.image, "image", cfg.autoencoder.in_channels)
        hw = (side(image.shape[2], f, "image"), side(image.shape[3], f, "image"))
        if inputs.mask is not None:
            mask = mask_batch(inputs.mask, image)
            if concat_inpaint:
                cat = inpaint_concat(codec, image, mask, mask_first=key == "hybrid")
                cond["concat"] = cat
                if key == "hybrid" and uncond is not None:
                    uncond["concat"] = cat
                else:
                    uncond, no_guidance = None, UNGUIDED.format(kind=cfg.conditioning.kind)
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
