"""Every value a sampling call takes, checked in one place, and turned into the denoiser's keyword tensors.

`gather` turns the arguments of both pipeline calls (prompts, class labels, layouts, semantic maps, low-res
images, an image with a mask or a strength, and the inputs of kinds registered outside ldmkit; pictures in any
form) into one `SampleInputs`, `n` samples per condition. `check_options` checks the sampling options.
`build_request` validates the inputs against the model (each bad input gets a ValueError naming it) and returns
the conditional and unconditional keyword tensors for classifier-free guidance, the latent size to sample, and
what the sampler needs for mask-based inpainting or img2img. The model's conditioning kind (`conditioning/`)
checks and encodes its own fields with the functions that built its training conditions, so a model is sampled
with what it learnt from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..conditioning import ConditionRoles, kind_of
from ..conditioning.base import UNGUIDED, side
from ..conditioning.concat import image_batch, inpaint_concat, mask_batch
from ..config import LDMConfig
from ..diffusion.noise import Generators
from ..latent import LatentCodec

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
    extra: dict[str, Any] = field(default_factory=dict)  # per-example inputs of kinds registered outside ldmkit

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
        return {**{k: getattr(self, k) for k in names if getattr(self, k) is not None}, **self.extra}

    def to(self, device: torch.device) -> SampleInputs:
        """The request with its tensors on `device` (where the autoencoder encodes them)."""
        moved = {k: v.to(device) for k, v in self.__dict__.items() if isinstance(v, Tensor)}
        extra = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.extra.items()}
        return SampleInputs(**{**self.__dict__, **moved, "extra": extra})

    def slice(self, start: int, stop: int) -> SampleInputs:
        """The requests for samples start..stop-1 (batching a large request)."""
        cut = {k: v[start:stop] for k, v in self.per_example().items()}
        out = SampleInputs(**{**self.__dict__, **{k: v for k, v in cut.items() if k not in self.extra},
                              "extra": {k: cut[k] for k in self.extra}})
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


# ---------------------------------------------------------------------------------------- the call's arguments

PICTURES = {"segmap": 3, "lowres": 4, "image": 4, "mask": 4}  # a tensor of this rank holds a batch of pictures


def gather(cfg: LDMConfig, *, prompt: str | Sequence[str] | None, class_label: int | Sequence[int] | None,
           layout: Layout | Sequence[Layout] | None, segmap: Any, lowres: Any, image: Any, mask: Any,
           strength: float | None, negative_prompt: str, n: int, conditions: dict[str, Any]
           ) -> tuple[SampleInputs, dict[str, list[Any]]]:
    """The arguments of a pipeline call as one request: `n` samples of each condition, condition-major.

    A list (or a batch tensor) gives one condition per entry; a single prompt or picture is shared by every
    condition given as a list. Pictures may be PIL images, numpy arrays, file paths or tensors. Returns the
    request and, per input, each sample's value (what the images' parameters record)."""
    from .images import image_tensor, index_map, mask_tensor

    channels = cfg.autoencoder.in_channels
    given: dict[str, list[Any]] = {}
    if prompt is not None:
        given["prompts"] = [prompt] if isinstance(prompt, str) else list(prompt)
    if class_label is not None:
        given["classes"] = ([int(class_label)] if isinstance(class_label, int)
                            else [int(c) for c in class_label])
    if layout is not None:
        given["layouts"] = [layout] if _is_one_layout(layout) else list(layout)
    convert = {"segmap": index_map, "mask": mask_tensor,
               "lowres": lambda v, what: image_tensor(v, channels, what),
               "image": lambda v, what: image_tensor(v, channels, what)}
    for name, value in (("segmap", segmap), ("lowres", lowres), ("image", image), ("mask", mask)):
        if value is not None:
            given[name] = [convert[name](v, name) for v in _entries(value, PICTURES[name])]
    for name, value in conditions.items():  # a registered kind's own input: one entry per condition
        given[name] = _entries(value, value.ndim if isinstance(value, Tensor) and value.ndim else -1)
    k = max((len(v) for v in given.values()), default=1)
    for name, items in given.items():
        if not items:
            raise ValueError(f"{name} is an empty list")
        if len(items) not in (1, k):
            raise ValueError(f"{name}: {len(items)} given, but other inputs give {k}: give 1 or {k}")
    per = {name: [items[i if len(items) > 1 else 0] for i in range(k) for _ in range(n)]
           for name, items in given.items()}  # condition-major: n samples of condition 0, then 1, ...
    joined = {name: torch.cat(v) if v and all(isinstance(x, Tensor) for x in v) else v for name, v in per.items()}
    extra = {name: joined[name] for name in conditions}
    inputs = SampleInputs(per.get("classes"), per.get("prompts"), negative_prompt, per.get("layouts"),
                          _picture_batch(joined, "segmap"), _picture_batch(joined, "lowres"),
                          _picture_batch(joined, "image"), _picture_batch(joined, "mask"),
                          strength, None if per else k * n, extra)
    return inputs, per


def _picture_batch(joined: dict[str, Tensor | list[Any]], name: str) -> Tensor | None:
    """A picture input's samples joined into one batch tensor, or None when it was not given."""
    batch = joined.get(name)
    assert batch is None or isinstance(batch, Tensor), name  # each picture was converted to a tensor above
    return batch


def _entries(value: Any, batch_rank: int) -> list[Any]:
    """A list's items, a batch tensor's rows ([1, ...] each), or the one value."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, Tensor) and value.ndim == batch_rank:
        return list(value.split(1))
    return [value]


def _is_one_layout(layout: Any) -> bool:
    """[(cls, x0, y0, x1, y1), ...] is one layout; a list of those is several."""
    first = layout[0] if len(layout) else None
    return first is not None and len(first) > 0 and not isinstance(first[0], (list, tuple))


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample, with the model's defaults filled in and every value checked."""

    sampler: str
    steps: int
    guidance: float
    guidance_rescale: float
    eta: float | None


def check_options(cfg: LDMConfig, num_timesteps: int, *, sampler: str | None, steps: int | None,
                  guidance: float | None, guidance_rescale: float | None, eta: float | None,
                  strength: float | None = None, n: int = 1, seed: int = 0, batch_size: int | None = 1
                  ) -> SamplingOptions:
    """Unset options from the model's sampling config (its eta goes with its sampler: another sampler without an
    explicit eta runs at its own default), then every value of a call checked, each error naming it."""
    from ..diffusion.samplers.registry import resolve_sampler

    sc = cfg.sampling
    if eta is None and _same_sampler(sampler or sc.sampler, sc.sampler):
        eta = sc.eta
    opts = SamplingOptions(sampler or sc.sampler, sc.steps if steps is None else steps,
                           sc.guidance if guidance is None else guidance,
                           sc.guidance_rescale if guidance_rescale is None else guidance_rescale, eta)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if strength is not None and not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if not 1 <= opts.steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {opts.steps}")
    if not opts.guidance >= 0 or opts.guidance != opts.guidance:
        raise ValueError(f"guidance must be a number >= 0, got {opts.guidance}")
    if not 0.0 <= opts.guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {opts.guidance_rescale}")
    if opts.eta is not None and not opts.eta >= 0:
        raise ValueError(f"eta must be >= 0, got {opts.eta}")
    resolve_sampler(opts.sampler)
    return opts


def _same_sampler(a: str, b: str) -> bool:
    from ..diffusion.samplers.registry import resolve_sampler

    try:
        return resolve_sampler(a) == resolve_sampler(b)
    except ValueError:  # an unknown name: check_options says so
        return False
