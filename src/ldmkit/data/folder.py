"""A generic image-folder dataset (own data for autoencoder / diffusion training).

Layouts:

* ``root/*.png`` (any depth when ``recursive``): unlabelled, every label is 0.
* ``root/<class>/*.png``: one class per immediate sub-folder; classes are the sorted sub-folder
  names and the label is the index into ``.classes`` (the torchvision convention).  Image files
  lying directly in ``root`` are then ignored, with a warning, because they have no class.

Images are converted to RGB or grayscale, the short side is resized to ``resolution`` and the
centre is cropped, giving ``float32 [C, resolution, resolution]`` in [-1, 1].
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "load_image"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _iter_images(folder: Path, recursive: bool) -> Iterator[Path]:
    """Image files under ``folder``, skipping hidden files and folders (.git, .ipynb_checkpoints...)."""
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if recursive:
                yield from _iter_images(entry, recursive)
        elif _is_image(entry):
            yield entry


def _resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Scale the short side to ``resolution`` and crop the centre square.

    Bicubic resampling in PIL is antialiased when shrinking, so large photos do not alias.
    """
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def load_image(path: str | Path, resolution: int, channels: int = 3) -> Tensor:
    """One image file -> ``float32 [channels, resolution, resolution]`` in [-1, 1].

    Any decoding failure (truncated file, not an image, unsupported format) raises ``ValueError``
    naming the file, so a bad file in a large folder can be found and removed.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    path = Path(path)
    img: Image.Image  # opened as an ImageFile, then replaced by the transposed / converted copies
    try:
        with Image.open(path) as img:
            img.load()  # decode now: Image.open is lazy and would defer truncation errors
            # camera JPEGs store their rotation in EXIF; apply it so portrait photos stay upright
            img = ImageOps.exif_transpose(img)
            # palette / 16-bit / CMYK / alpha images all become plain L or RGB; alpha is dropped
            img = img.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    img = _resize_center_crop(img, resolution)
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3] or [H, W]
    if arr.ndim == 2:
        arr = arr[:, :, None]  # [H, W, 1]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [C, H, W] uint8
    return x.to(torch.float32).div_(127.5).sub_(1.0)


class ImageFolder(Dataset):
    """Images under ``root`` as ``(float32 [channels, resolution, resolution] in [-1, 1], label int)``.

    Attributes:
        files: sorted image paths.
        labels: class index of each file (all 0 without class sub-folders).
        classes: sorted class sub-folder names, or ``[]`` when the folder is unlabelled.
    """

    def __init__(self, root: str | Path, resolution: int, channels: int = 3, recursive: bool = True) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        self.resolution = resolution
        self.channels = channels

        # A sub-folder is a class only if it holds images, so stray empty or metadata folders do
        # not shift the class indices.
        class_dirs = [
            d
            for d in sorted(self.root.iterdir())
            if d.is_dir() and not d.name.startswith(".") and next(_iter_images(d, recursive), None) is not None
        ]
        files: list[Path] = []
        labels: list[int] = []
        if class_dirs:
            self.classes: list[str] = [d.name for d in class_dirs]
            for index, d in enumerate(class_dirs):
                for f in _iter_images(d, recursive):
                    files.append(f)
                    labels.append(index)
            loose = [p for p in sorted(self.root.iterdir()) if _is_image(p)]
            if loose:
                warnings.warn(
                    f"{self.root} has class sub-folders; ignoring {len(loose)} image(s) directly in it "
                    f"(e.g. {loose[0].name})",
                    stacklevel=2,
                )
        else:
            self.classes = []
            files = list(_iter_images(self.root, recursive=False))
            labels = [0] * len(files)
        if not files:
            raise ValueError(
                f"no images found in {self.root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}"
                f"{', recursively' if recursive else ''})"
            )
        self.files = files
        self.labels = labels

    @property
    def num_classes(self) -> int:
        return max(1, len(self.classes))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return load_image(self.files[index], self.resolution, self.channels), self.labels[index]
