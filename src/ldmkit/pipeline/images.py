"""Pictures in and out: users hold them as PIL images, numpy arrays, files or tensors.

`image_tensor`, `mask_tensor` and `index_map` turn any of them into the tensors `pipeline.inputs` checks, each
with an error that names the input; `parse_layout` reads a layout written as text; `to_pil` gives PIL images back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..data.images import to_uint8

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
