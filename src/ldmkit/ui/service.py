"""What the web page does, without the web page: which tasks a model offers, the server's limits, and one
checked call into the pipeline per request.

The Gradio app (`ui/app.py`) only wires widgets to `Service.run`; everything a user can get wrong is
refused here with a message that names the field and the allowed range, so the same checks hold for the
page, for its HTTP API and for tests that call this module directly.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..conditioning import kind_of
from ..diffusion.samplers.registry import resolve_sampler
from ..pipeline import LatentDiffusionPipeline
from ..pipeline.generation import Generation
from ..pipeline.images import index_map, mask_tensor, parse_layout

TASKS = {
    "generate": "Generate",
    "img2img": "Image to image",
    "inpaint": "Inpaint",
    "upscale": "Super-resolution",
    "segmap": "Semantic map",
}
SEED_MAX = 2**31 - 1
# the samplers a person picks from a menu (every registered name and alias is accepted through the API)
MENU_SAMPLERS = ("ddim", "plms", "DPM++ 2M Karras", "DPM++ 2M", "DPM++ 2M SDE Karras", "Euler a", "Euler", "Heun",
                 "LMS")


class RequestError(ValueError):
    """A request the server refuses; the message is shown to the user as it is."""


@dataclass
class Limits:
    """What one request may ask of this server (a shared CPU or GPU: keep requests bounded)."""

    max_steps: int = 100
    max_size: int = 512  # pixels, either side, of generated and uploaded images
    max_images: int = 4  # images per request
    max_guidance: float = 30.0
    max_prompt_chars: int = 1000


@dataclass
class PageRequest:
    """One form submission, as the page sends it (numbers may arrive as floats or None)."""

    task: str
    prompt: str = ""
    negative_prompt: str = ""
    class_label: float | None = None
    layout: str = ""
    image: Any = None  # PIL image (img2img), or the image editor's {"background", "layers", "composite"}
    lowres: Any = None
    segmap: Any = None
    strength: float | None = 0.6
    sampler: str | None = None
    steps: float | None = None
    guidance: float | None = None
    seed: float | None = -1
    n: float | None = 1
    size: float | None = None


class Service:
    """A loaded pipeline behind limits. Gradio's queue runs one request at a time (concurrency 1)."""

    def __init__(self, pipe: LatentDiffusionPipeline, limits: Limits | None = None) -> None:
        self.pipe = pipe
        self.limits = limits or Limits()
        kind = kind_of(pipe.cfg)
        roles = kind.roles(pipe.cfg)
        self.text, self.layout, self.classes = roles.text, roles.layout, pipe.n_classes
        self.tasks = kind.tasks(pipe.cfg)  # the tabs this model's conditioning kind offers
        # image sides must be multiples of this: the autoencoder's factor times the UNet's downsampling
        self.multiple = pipe.codec.downsample_factor * 2 ** (len(pipe.cfg.unet.channel_mult) - 1)

    @property
    def defaults(self) -> dict[str, Any]:
        sc = self.pipe.cfg.sampling
        return {"sampler": sc.sampler, "steps": min(sc.steps, self.limits.max_steps), "guidance": sc.guidance,
                "size": self.pipe.resolution}

    @property
    def samplers(self) -> list[str]:
        first = self.pipe.cfg.sampling.sampler
        return [first] + [s for s in MENU_SAMPLERS if s.lower() != first.lower() and _known(s)]

    def run(self, req: PageRequest, progress: Callable[[int, int], None] | None = None) -> tuple[Generation, str]:
        """Check `req` against the model and the limits, generate, and describe what was made."""
        if req.task not in self.tasks:
            raise RequestError(f"this model does not do {TASKS.get(req.task, req.task)!r}; it offers "
                               + ", ".join(TASKS[t] for t in self.tasks))
        lim = self.limits
        steps = _integer(req.steps, "steps", 1, lim.max_steps, self.defaults["steps"])
        n = _integer(req.n, "number of images", 1, lim.max_images, 1)
        seed = _integer(req.seed, "seed", -1, SEED_MAX, -1)
        seed = secrets.randbelow(SEED_MAX - n) if seed == -1 else min(seed, SEED_MAX - n)
        guidance = self.defaults["guidance"] if req.guidance is None else float(req.guidance)
        if not 0 <= guidance <= lim.max_guidance:
            raise RequestError(f"guidance must be between 0 and {lim.max_guidance:g}, got {guidance:g}")
        sampler = req.sampler or self.defaults["sampler"]
        if not _known(sampler):
            raise RequestError(f"unknown sampler {sampler!r}")
        kwargs: dict[str, Any] = dict(n=n, seed=seed, steps=steps, sampler=sampler, guidance=guidance)
        self._condition(req, kwargs)
        if req.task == "generate":
            size = _integer(req.size, "size", self.multiple, lim.max_size, self.defaults["size"])
            if size % self.multiple:
                raise RequestError(f"size must be a multiple of {self.multiple} pixels for this model, got {size}")
            kwargs.update(height=size, width=size)
        elif req.task == "img2img":
            kwargs["image"] = self._picture(req.image, "image")
            strength = 0.6 if req.strength is None else float(req.strength)
            if not 0 < strength <= 1:
                raise RequestError(f"strength must be in (0, 1], got {strength:g}")
            kwargs["strength"] = strength
        elif req.task == "inpaint":
            image, mask = self._image_and_mask(req.image)
            kwargs.update(image=image, mask=mask)
        elif req.task == "upscale":
            low = self._picture(req.lowres, "low-resolution image", scale=self.pipe.cfg.conditioning.sr_factor)
            kwargs["lowres"] = low
        elif req.task == "segmap":
            kwargs["segmap"] = self._segmap(req.segmap)

        def on_step(info: dict[str, Any]) -> None:
            if progress is not None:
                progress(int(info.get("i", 0)) + 1, steps)

        try:
            out = self.pipe(callback=on_step, batch_size=n, **kwargs)
        except ValueError as e:  # the pipeline's own checks (e.g. a class out of range): shown as they are
            raise RequestError(str(e)) from None
        w, h = out.images[0].size
        info = (f"{len(out)} image(s), {w}x{h} px, seeds {out.seeds[0]}..{out.seeds[-1]}, "
                f"{out.parameters[0]['sampler']}, {steps} steps, guidance {guidance:g}")
        return out, info

    # ------------------------------------------------------------------------------------------ inputs

    def _condition(self, req: PageRequest, kwargs: dict[str, Any]) -> None:
        if self.text:
            prompt = (req.prompt or "").strip()
            if not prompt:
                raise RequestError("the prompt is empty: describe the image to generate")
            longest = max(len(prompt), len(req.negative_prompt or ""))
            if longest > self.limits.max_prompt_chars:
                raise RequestError(f"prompts are limited to {self.limits.max_prompt_chars} characters")
            kwargs.update(prompt=prompt, negative_prompt=(req.negative_prompt or "").strip())
        elif self.classes:
            if req.class_label is not None and str(req.class_label).strip() != "":
                kwargs["class_label"] = _integer(req.class_label, "class", 0, self.classes - 1, 0)
        elif self.layout:
            if not (req.layout or "").strip():
                raise RequestError("the layout is empty: give objects as 'class:x0,y0,x1,y1;...' (boxes in [0, 1])")
            try:
                kwargs["layout"] = parse_layout(req.layout)
            except ValueError as e:
                raise RequestError(str(e)) from None

    def _fit(self, im: Image.Image, what: str, scale: int = 1) -> Image.Image:
        """Refuse pictures over the size limit; resize others down to the model's multiple (as A1111 does)."""
        if not isinstance(im, Image.Image):
            raise RequestError(f"upload the {what} first")
        max_in = self.limits.max_size // scale
        if max(im.size) > max_in:
            raise RequestError(f"the {what} is {im.width}x{im.height} px; this server takes at most {max_in} px a "
                               "side" + (f" (x{scale} = {self.limits.max_size} px out)" if scale > 1 else ""))
        m = max(1, self.multiple // scale)
        size = (max(m, im.width // m * m), max(m, im.height // m * m))
        return im if size == im.size else im.resize(size, Image.Resampling.BICUBIC)

    def _picture(self, im: Any, what: str, scale: int = 1) -> Image.Image:
        if isinstance(im, dict):  # an image editor's value: its background is the picture
            im = im.get("background")
        return self._fit(im, what, scale).convert("RGB")

    def _image_and_mask(self, value: Any) -> tuple[Image.Image, Any]:
        """The image editor's value -> (picture, mask): the mask is every brush stroke on any layer."""
        if not isinstance(value, dict) or not isinstance(value.get("background"), Image.Image):
            raise RequestError("upload an image, then paint the region to fill")
        background = value["background"].convert("RGB")
        layers = [la for la in value.get("layers") or [] if isinstance(la, Image.Image)]
        if not layers:
            raise RequestError("paint the region to fill on the image (no brush stroke found)")
        painted = np.zeros((background.height, background.width), dtype=bool)
        for la in layers:  # a stroke is any pixel a layer covers (alpha > 0)
            alpha = la.convert("RGBA").getchannel("A").resize(background.size, Image.Resampling.NEAREST)
            painted |= np.asarray(alpha) > 0
        if not painted.any():
            raise RequestError("paint the region to fill on the image (the mask is empty)")
        image = self._fit(background, "image")
        mask = Image.fromarray(painted.astype(np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)
        return image, mask_tensor(mask)

    def _segmap(self, im: Any) -> Any:
        if not isinstance(im, Image.Image):
            raise RequestError("upload a semantic map (a grey PNG whose pixel values are class indices)")
        if max(im.size) > self.limits.max_size:
            raise RequestError(f"the map is {im.width}x{im.height} px; this server takes at most "
                               f"{self.limits.max_size} px a side")
        try:
            return index_map(im.convert("L") if im.mode in ("RGB", "RGBA") else im, "semantic map")
        except ValueError as e:
            raise RequestError(str(e)) from None


def _known(name: str) -> bool:
    try:
        resolve_sampler(name)
    except ValueError:
        return False
    return True


def _integer(value: Any, what: str, lo: int, hi: int, default: int) -> int:
    """A whole number in [lo, hi] from a form field (None or "" -> default)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{what} must be a whole number, got {value!r}") from None
    if not math.isfinite(x) or x != int(x) or not lo <= x <= hi:
        raise RequestError(f"{what} must be a whole number between {lo} and {hi}, got {value}")
    return int(x)
