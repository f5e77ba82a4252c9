"""What an image-level call gives back, and how a saved picture says how to make it again.

`Generation` holds PIL images, the seed of each, its generation parameters and, on request, the latents.
Saved PNGs carry the parameters twice: as A1111's "parameters" text (readable by its PNG info) and as JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError
from torch import Tensor

from ..data.images import make_grid
from .images import to_pil


def parameters_text(p: dict[str, Any]) -> str:
    """A1111's "parameters" text: prompt, negative prompt, then "Key: value" pairs (readable by its PNG info)."""
    lines = [str(p.get("prompt") or "")]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    names = {"steps": "Steps", "sampler": "Sampler", "guidance": "CFG scale", "seed": "Seed", "eta": "Eta",
             "strength": "Denoising strength", "guidance_rescale": "Guidance rescale", "class_label": "Class",
             "layout": "Layout", "model": "Model"}
    pairs = [f"{label}: {p[k]}" for k, label in names.items() if p.get(k) is not None]
    pairs.insert(4, f"Size: {p['width']}x{p['height']}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, parameters: dict[str, Any]) -> Path:
    """Write `image` as PNG with its generation parameters ("parameters" text and "ldmkit" JSON chunks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(parameters))
    info.add_text("ldmkit", json.dumps(parameters, sort_keys=True, default=str))
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The generation parameters a saved PNG carries (its "ldmkit" chunk)."""
    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get("ldmkit")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if text is None:
        raise ValueError(f"{path} carries no ldmkit generation parameters")
    return json.loads(text)


@dataclass
class Generation:
    """The result of one pipeline call: image i was made with seeds[i] and parameters[i]."""

    images: list[Image.Image]
    seeds: list[int]
    parameters: list[dict[str, Any]]
    latents: Tensor | None = None  # [N, C, h, w] scaled latents, when asked for (return_latents=True)
    tensors: Tensor | None = field(default=None, repr=False)  # [N, C, H, W] in [-1, 1], as decoded

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Image.Image:
        return self.images[i]

    def save(self, outdir: str | Path, *, start: int = 0) -> list[Path]:
        """Write each image as outdir/NNNNN.png (numbered from `start`) with its parameters inside."""
        return [save_png(im, Path(outdir) / f"{start + i:05d}.png", p)
                for i, (im, p) in enumerate(zip(self.images, self.parameters, strict=True))]

    def grid(self, nrow: int, scale: int = 1) -> Image.Image:
        """All images tiled row-major, `nrow` per row, nearest-neighbour upscaled by `scale`."""
        if self.tensors is None:
            raise ValueError("this Generation holds no image tensors to tile")
        img = to_pil(make_grid(self.tensors, nrow)[None])[0]
        return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST) if scale > 1 else img

    def save_grid(self, path: str | Path, nrow: int, scale: int = 1) -> Path:
        """Write the grid as PNG; its parameters are the first image's, with every seed listed."""
        params = {**self.parameters[0], "seeds": self.seeds, "n_images": len(self)}
        return save_png(self.grid(nrow, scale), path, params)


def image_parameters(model: str, sampler: str, steps: int, guidance: float, guidance_rescale: float,
                     eta: float | None, per: dict[str, list[Any]], seeds: list[int], height: int, width: int,
                     negative_prompt: str, strength: float | None) -> list[dict[str, Any]]:
    """Each image's generation parameters: what was actually run, the model's defaults filled in."""
    from ..diffusion.samplers.registry import resolve_sampler

    spec, grid = resolve_sampler(sampler)
    common = {"model": model, "sampler": spec.name + (f" {grid}" if grid else ""), "steps": steps, "eta": eta,
              "guidance": guidance, "guidance_rescale": guidance_rescale or None, "strength": strength,
              "height": height, "width": width, "negative_prompt": negative_prompt or None}
    out = []
    for i, s in enumerate(seeds):
        p = {**common, "seed": s}
        if "prompts" in per:
            p["prompt"] = per["prompts"][i]
        if "classes" in per:
            p["class_label"] = per["classes"][i]
        if "layouts" in per:
            p["layout"] = [list(o) for o in per["layouts"][i]]
        out.append(p)
    return out
