"""Real photographs that ship inside the scikit-image (and scikit-learn) wheels, as random crops.

No network access is ever attempted: the image files are read with PIL straight from the installed
packages' data folders (``skimage/data``, ``sklearn/datasets/images``).  ``skimage.data.<name>()`` is
not called because for images missing from the wheel it would try a ``pooch`` download.

Only photos whose licence is stated by the shipping package are listed, and by default only those
stated to be public domain or CC0 are used.  The licence of every photo is in ``PHOTOS`` below
(statements quoted from the ``skimage.data`` docstrings of scikit-image 0.26 and from
``sklearn/datasets/images/README.txt``):

==================== ============ ======================= ==============================================
name                 package      licence                 statement / credit
==================== ============ ======================= ==============================================
astronaut            scikit-image public-domain           NASA; "No known copyright restrictions,
                                                          released into the public domain."
coffee               scikit-image cc0                     "No copyright restrictions. CC0 by the
                                                          photographer (Rachel Michetti)."
chelsea              scikit-image cc0                     "No copyright restrictions. CC0 by the
                                                          photographer (Stefan van der Walt)."
rocket               scikit-image public-domain           SpaceX; "released in the public domain"
hubble_deep_field    scikit-image public-domain           NASA; "may be freely used in the public domain"
retina               scikit-image cc0                     M. Haggstrom; "Creative Commons CC0 1.0
                                                          Universal Public Domain Dedication."
camera (grey)        scikit-image cc0                     "No copyright restrictions. CC0 by the
                                                          photographer (Lav Varshney)."
clock (grey)         scikit-image public-domain           "Released into the public domain by the
                                                          photographer (Stefan van der Walt)."
brick, grass,        scikit-image cc0                     CC0Textures / DeviantArt, "Creative Commons
gravel (grey)                                             CC0 License" (textures, not scenes)
immunohistochemistry scikit-image no-known-restrictions   CMMI; "No known copyright restrictions."
coins (grey)         scikit-image no-known-restrictions   Brooklyn Museum; "No known copyright
                                                          restrictions."
china, flower        scikit-learn cc-by-2.0               Flickr (danielbuechele, vultilion); CC BY 2.0,
                                                          attribution required
==================== ============ ======================= ==============================================

"No known copyright restrictions" is weaker than an explicit dedication and CC BY needs attribution,
so those photos are used only when asked for with ``licenses=``.  Not listed at all: bundled
scikit-image images without any licence statement (moon, page, logo, colorwheel, the Middlebury
motorcycle stereo pair) and non-photographs (text, horse, phantom, chessboard).

Split: held-out crops must come from photos never trained on, so the split is by photo.
``HELD_OUT = ("chelsea", "coffee")`` (a close-up of an animal and a still life, both warm browns and
oranges) are never in ``"train"``; the training photos keep a portrait (astronaut), an outdoor scene with
blue sky (rocket), an astronomical and a medical image, so the held-out colours are ones the training set
has (holding out rocket, the only bluish photo, left a colour no training photo had: reconstructions of its
sky came out dark).  Grey photos, when included, are replicated to three channels and go to
``"train"``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "FREE_LICENSES",
    "HELD_OUT",
    "PHOTOS",
    "SPLITS",
    "PhotoCrops",
    "PhotoInfo",
    "PhotoSource",
    "photo_crops",
    "photo_sources",
    "split_sources",
]

# licence categories used by default: explicit public-domain releases and CC0 dedications
FREE_LICENSES: tuple[str, ...] = ("public-domain", "cc0")
LICENSE_CATEGORIES: tuple[str, ...] = ("public-domain", "cc0", "no-known-restrictions", "cc-by-2.0")
HELD_OUT: tuple[str, ...] = ("chelsea", "coffee")
SPLITS: tuple[str, ...] = ("train", "held_out", "all")

# package -> (import name, data folder inside the package, install hint)
_PACKAGES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "scikit-image": ("skimage", ("data",), "pip install scikit-image"),
    "scikit-learn": ("sklearn", ("datasets", "images"), "pip install scikit-learn"),
}


@dataclass(frozen=True)
class PhotoInfo:
    """One entry of the licence table: where the file lives and under which terms it may be used."""

    name: str
    package: str  # "scikit-image" or "scikit-learn"
    file: str  # file name inside the package's data folder
    color: bool  # False: a greyscale photo, replicated to 3 channels when loaded
    license: str  # one of LICENSE_CATEGORIES
    statement: str  # the licence statement as the shipping package gives it
    credit: str  # photographer / source


_SK = "scikit-image"
PHOTOS: tuple[PhotoInfo, ...] = (
    PhotoInfo("astronaut", _SK, "astronaut.png", True, "public-domain",
              "No known copyright restrictions, released into the public domain.",
              "NASA Great Images database (Eileen Collins)"),
    PhotoInfo("coffee", _SK, "coffee.png", True, "cc0",
              "No copyright restrictions. CC0 by the photographer (Rachel Michetti).", "Rachel Michetti"),
    PhotoInfo("chelsea", _SK, "chelsea.png", True, "cc0",
              "No copyright restrictions. CC0 by the photographer (Stefan van der Walt).", "Stefan van der Walt"),
    PhotoInfo("rocket", _SK, "rocket.jpg", True, "public-domain",
              "The image was captured by SpaceX and released in the public domain.", "SpaceX"),
    PhotoInfo("hubble_deep_field", _SK, "hubble_deep_field.jpg", True, "public-domain",
              "The image was captured by NASA and may be freely used in the public domain.", "NASA / Hubble"),
    PhotoInfo("retina", _SK, "retina.jpg", True, "cc0",
              "Creative Commons CC0 1.0 Universal Public Domain Dedication.", "Mikael Haggstrom (Wikimedia)"),
    PhotoInfo("camera", _SK, "camera.png", False, "cc0",
              "No copyright restrictions. CC0 by the photographer (Lav Varshney).", "Lav Varshney"),
    PhotoInfo("clock", _SK, "clock_motion.png", False, "public-domain",
              "Released into the public domain by the photographer (Stefan van der Walt).", "Stefan van der Walt"),
    PhotoInfo("brick", _SK, "brick.png", False, "cc0",
              "Downloaded from CC0Textures and licensed under the Creative Commons CC0 License.", "CC0Textures"),
    PhotoInfo("grass", _SK, "grass.png", False, "cc0",
              "Downloaded from DeviantArt and licensed under the Creative Commons CC0 License.", "linolafett"),
    PhotoInfo("gravel", _SK, "gravel.png", False, "cc0",
              "Downloaded from CC0Textures and licensed under the Creative Commons CC0 License.", "CC0Textures"),
    PhotoInfo("immunohistochemistry", _SK, "ihc.png", True, "no-known-restrictions",
              "No known copyright restrictions.", "Center for Microscopy And Molecular Imaging (CMMI)"),
    PhotoInfo("coins", _SK, "coins.png", False, "no-known-restrictions",
              "No known copyright restrictions.", "Brooklyn Museum Collection"),
    PhotoInfo("china", "scikit-learn", "china.jpg", True, "cc-by-2.0",
              "Released under a creative commons license (CC BY 2.0). Attribution: Some rights reserved by "
              "danielbuechele.", "danielbuechele, https://www.flickr.com/photos/danielbuechele/6061409035"),
    PhotoInfo("flower", "scikit-learn", "flower.jpg", True, "cc-by-2.0",
              "Released under a creative commons license (CC BY 2.0). Attribution as given by scikit-learn: "
              "Some rights reserved by danielbuechele.", "https://www.flickr.com/photos/vultilion/6056698931"),
)
_BY_NAME: dict[str, PhotoInfo] = {p.name: p for p in PHOTOS}


@dataclass(frozen=True, eq=False)
class PhotoSource:
    """A loaded photo: ``array`` is read-only ``uint8 [H, W, 3]``; ``license`` is the category."""

    name: str
    array: np.ndarray
    license: str
    info: PhotoInfo


def _data_folder(package: str) -> Path:
    module, sub, hint = _PACKAGES[package]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the photos of ldmkit.data.photos ship inside {package}, which is not installed. "
            f"Install it with:  {hint}"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location).joinpath(*sub)
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"the installed {package} has no {'/'.join(sub)} folder; reinstall it with: {hint}")


@cache
def _load(name: str) -> np.ndarray:
    info = _BY_NAME[name]
    path = _data_folder(info.package) / info.file
    if not path.is_file():
        # never fall back to skimage's pooch download: only files bundled in the wheel are used
        raise FileNotFoundError(
            f"photo {name!r} ({path}) is not bundled in the installed {info.package}; reinstall it with: "
            f"{_PACKAGES[info.package][2]}"
        )
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3]; grey L -> replicated RGB
    arr = np.ascontiguousarray(arr)
    arr.flags.writeable = False  # cached and shared between callers
    return arr


def photo_sources(
    names: Sequence[str] | None = None,
    *,
    include_gray: bool = False,
    licenses: Sequence[str] = FREE_LICENSES,
) -> list[PhotoSource]:
    """The bundled photos, in ``PHOTOS`` order, whose licence category is in ``licenses``.

    ``include_gray`` adds the greyscale photos (as 3 identical channels).  ``names`` picks photos
    explicitly; each must still pass the licence filter, so a CC BY photo needs
    ``licenses=(..., "cc-by-2.0")``.
    """
    unknown = [c for c in licenses if c not in LICENSE_CATEGORIES]
    if unknown:
        raise ValueError(f"unknown licence categories {unknown}; valid ones are {list(LICENSE_CATEGORIES)}")
    if names is None:
        chosen = [p for p in PHOTOS if p.license in licenses and (p.color or include_gray)]
    else:
        chosen = []
        for name in names:
            if name not in _BY_NAME:
                raise ValueError(f"unknown photo {name!r}; available: {sorted(_BY_NAME)}")
            info = _BY_NAME[name]
            if info.license not in licenses:
                raise ValueError(
                    f"photo {name!r} is licensed {info.license!r}, not in licenses={tuple(licenses)}; "
                    "add that category to use it"
                )
            chosen.append(info)
        if len(set(names)) != len(names):
            raise ValueError(f"photo names must be unique, got {list(names)}")
    if not chosen:
        raise ValueError(f"no photo matches licenses={tuple(licenses)}, include_gray={include_gray}")
    return [PhotoSource(p.name, _load(p.name), p.license, p) for p in chosen]


def split_sources(
    split: str, sources: Sequence[PhotoSource] | None = None, held_out: Sequence[str] = HELD_OUT
) -> list[PhotoSource]:
    """The photos of ``split`` ("train", "held_out" or "all") among ``sources`` (default ``photo_sources()``).

    The split is by photo: a held-out photo contributes no pixel to ``"train"``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown photo split {split!r}; valid splits are {list(SPLITS)}")
    sources = photo_sources() if sources is None else list(sources)
    names = [s.name for s in sources]
    missing = [h for h in held_out if h not in names]
    if missing and split != "all":  # a misspelt held-out name would silently leak a photo into "train"
        raise ValueError(f"held-out photos {missing} are not among the sources {names}")
    if split == "all":
        chosen = sources
    elif split == "train":
        chosen = [s for s in sources if s.name not in held_out]
    else:
        chosen = [s for s in sources if s.name in held_out]
    if not chosen:
        raise ValueError(f"split {split!r} is empty for sources {names} with held_out={list(held_out)}")
    return chosen


class PhotoCrops(Dataset):
    """``n`` random square crops of the photos of ``split``, as ``(image [3, size, size] in [-1, 1], photo index)``.

    For each crop (all draws from one ``torch.Generator``; the global RNG is untouched):

    1. a photo, uniformly (every photo weighs the same, whatever its size);
    2. a scale ``s`` log-uniform in ``scale``; the crop side in photo pixels is
       ``size * s * short_side / base_short_side`` (clipped to the short side), i.e. the crop covers
       what a ``size`` crop would cover after resizing the photo's short side to
       ``base_short_side / s``.  This makes the content density comparable across photos of
       300-1411 pixels;
    3. a uniform position, then an antialiased bilinear resize to ``size`` (no overshoot, so values
       stay in [-1, 1]), and a horizontal flip with probability 1/2 if ``hflip``;
    4. with ``channel_shuffle``, one of the six orders of the RGB channels, uniformly.  With four colour
       training photos, one of them the red retina, an autoencoder learns their colours as a prior (it
       reconstructed held-out photos with a red cast); shuffled channels leave it no colour to prefer.

    Attributes: ``images`` float32 ``[N, 3, size, size]``; ``photo_index`` int64 ``[N]`` (into
    ``names``); ``boxes`` int64 ``[N, 3]`` = (top, left, side) in photo pixels; ``flipped`` bool ``[N]``;
    ``channel_order`` int64 ``[N, 3]`` (the source channel of each output channel).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 64,
        n: int = 1024,
        *,
        seed: int = 0,
        generator: torch.Generator | None = None,
        scale: tuple[float, float] = (0.75, 1.5),
        hflip: bool = True,
        channel_shuffle: bool = False,
        base_short_side: int = 256,
        sources: Sequence[PhotoSource] | None = None,
        held_out: Sequence[str] = HELD_OUT,
    ) -> None:
        if size <= 0 or n < 0:
            raise ValueError(f"size must be positive and n non-negative, got size={size}, n={n}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        if base_short_side <= 0:
            raise ValueError(f"base_short_side must be positive, got {base_short_side}")
        photos = split_sources(split, sources, held_out)
        self.split = split
        self.size = size
        self.names = [p.name for p in photos]
        self.licenses = {p.name: p.license for p in photos}
        g = generator if generator is not None else torch.Generator().manual_seed(seed)

        # all draws up front, in a fixed order, so a crop depends only on the generator state
        idx = torch.randint(0, len(photos), (n,), generator=g)  # [N]
        log_lo, log_hi = math.log(scale[0]), math.log(scale[1])
        s = torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * (log_hi - log_lo) + log_lo)  # [N]
        u_top = torch.rand(n, generator=g, dtype=torch.float64)
        u_left = torch.rand(n, generator=g, dtype=torch.float64)
        flip = torch.rand(n, generator=g) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
        # drawn last, so that the crops without it stay the ones earlier releases made from the same seed
        order = (torch.argsort(torch.rand(n, 3, generator=g), dim=1) if channel_shuffle
                 else torch.arange(3).expand(n, 3).clone())  # [N, 3]

        tensors = [torch.from_numpy(np.array(p.array)).permute(2, 0, 1) for p in photos]  # [3, H, W] uint8
        images = torch.empty(n, 3, size, size, dtype=torch.float32)
        boxes = torch.empty(n, 3, dtype=torch.int64)
        for i in range(n):
            photo = tensors[int(idx[i])]
            h, w = photo.shape[1:]
            short = min(h, w)
            side = min(short, max(1, round(size * float(s[i]) * short / base_short_side)))
            top = min(h - side, int(float(u_top[i]) * (h - side + 1)))
            left = min(w - side, int(float(u_left[i]) * (w - side + 1)))
            crop = photo[:, top : top + side, left : left + side].to(torch.float32)  # [3, side, side]
            if side != size:
                crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False,
                                     antialias=True)[0]  # [3, size, size]
            if flip[i]:
                crop = crop.flip(-1)
            images[i] = crop[order[i]]
            boxes[i] = torch.tensor([top, left, side])
        self.images = images.div_(127.5).sub_(1.0).clamp_(-1.0, 1.0)
        self.photo_index = idx
        self.boxes = boxes
        self.flipped = flip
        self.channel_order = order
        self.photo_shapes = [tuple(t.shape[1:]) for t in tensors]  # (H, W) per photo

    def region_labels(self, grid: int = 2) -> Tensor:
        """``photo_index * grid^2 + cell`` where ``cell`` is the ``grid x grid`` cell of the photo holding
        the crop centre (in photo coordinates, so flipping does not change it): int64 ``[N]``."""
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        hw = torch.tensor(self.photo_shapes, dtype=torch.float64)[self.photo_index]  # [N, 2]
        centre = self.boxes[:, :2].to(torch.float64) + self.boxes[:, 2:3].to(torch.float64) / 2  # [N, 2] (y, x)
        cell = (centre / hw * grid).floor().clamp(0, grid - 1).to(torch.int64)  # [N, 2]
        return self.photo_index * grid * grid + cell[:, 0] * grid + cell[:, 1]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.photo_index[index])


def photo_crops(split: str = "train", size: int = 64, n: int = 1024, **kwargs) -> Tensor:
    """Just the crop tensor ``float32 [n, 3, size, size]`` in [-1, 1] of ``PhotoCrops(split, size, n, **kwargs)``."""
    return PhotoCrops(split, size, n, **kwargs).images
