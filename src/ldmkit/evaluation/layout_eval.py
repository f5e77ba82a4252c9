"""Does a generated canvas follow its layout or semantic map? Two figures for MNIST digit canvases.

* ``box_digit_accuracy`` (layout-to-image): every requested box is cut out of the sample, resized the
  way MNIST digits look to the judge (the box content scaled to a 28x28 cell, padded with background to
  32x32, in [-1, 1]) and classified; the figure is the share of boxes whose predicted digit is the one
  asked for. ``data.canvases`` pastes a digit's whole 28x28 cell into its box, so on real canvases this
  inverts the pasting and measures the judge's own accuracy; a model that draws the wrong digit, or the
  right one in the wrong place, scores lower. Ten classes make chance about 0.1.
* ``segmap_iou`` (semantic synthesis): intersection over union between where ink was asked for
  (``segmap > 0``) and where the sample has ink (pixels above ``threshold``), per image, averaged. It
  checks shapes and positions, not digit identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .classifier import predict

__all__ = ["box_digit_accuracy", "crop_boxes", "segmap_iou"]

_CELL = 28  # MNIST digit cell
_JUDGE = 32  # judge input: the cell padded with 2 px of background on each side


def _check_images(images: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> ``[N, H, W]`` grey (channel mean), float32."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [N, C, H, W] in [-1, 1], got {shape}")
    return images.detach().to(torch.float32).mean(dim=1)  # [N, H, W]


def _pixel_box(where: str, box: Sequence, height: int, width: int) -> tuple[int, int, int, int, int]:
    """``(class, x0, y0, x1, y1)`` in [0, 1] -> class and pixel bounds, at least one pixel each way."""
    if len(box) != 5:
        raise ValueError(f"{where}: expected (class, x0, y0, x1, y1), got {len(box)} values")
    cls, x0, y0, x1, y1 = int(box[0]), *(float(v) for v in box[1:])
    if not 0 <= cls <= 9:
        raise ValueError(f"{where}: the judge knows digits 0..9, got class {cls}")
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"{where}: box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {(x0, y0, x1, y1)}")
    c0, c1 = min(round(x0 * width), width - 1), round(x1 * width)
    r0, r1 = min(round(y0 * height), height - 1), round(y1 * height)
    return cls, c0, r0, max(c1, c0 + 1), max(r1, r0 + 1)


def crop_boxes(images: Tensor, layouts: Sequence[Sequence[tuple[int, float, float, float, float]]]) \
        -> tuple[Tensor, Tensor]:
    """Every box of every layout as a judge input: ``([M, 1, 32, 32] in [-1, 1], classes [M])``.

    ``images [N, C, H, W]`` in [-1, 1] (channels averaged); ``layouts[i]`` lists image ``i``'s boxes as
    ``(digit, x0, y0, x1, y1)`` in [0, 1]. Boxes come out in layout order. Each crop is resized to 28x28
    (antialiased bilinear, so large boxes of big samples do not alias) and padded with -1 to 32x32.
    """
    grey = _check_images(images)  # [N, H, W]
    n, height, width = grey.shape
    if len(layouts) != n:
        raise ValueError(f"got {len(layouts)} layouts for {n} images")
    boxes = [(i, *_pixel_box(f"image {i}, box {j}", box, height, width))
             for i, layout in enumerate(layouts) for j, box in enumerate(layout)]
    out = torch.empty(len(boxes), 1, _CELL, _CELL)
    # batch the resizing by crop shape: generated canvases use a dozen box sizes, not thousands
    by_shape: dict[tuple[int, int], list[int]] = {}
    for k, (_, _, c0, r0, c1, r1) in enumerate(boxes):
        by_shape.setdefault((r1 - r0, c1 - c0), []).append(k)
    for (h, w), ks in by_shape.items():
        crops = torch.stack([grey[boxes[k][0], boxes[k][3] : boxes[k][5], boxes[k][2] : boxes[k][4]] for k in ks])
        crops = crops.unsqueeze(1)  # [G, 1, h, w]
        if (h, w) != (_CELL, _CELL):
            crops = F.interpolate(crops, size=(_CELL, _CELL), mode="bilinear", antialias=True, align_corners=False)
        out[ks] = crops
    pad = (_JUDGE - _CELL) // 2
    digits = F.pad(out, (pad, pad, pad, pad), value=-1.0)  # [M, 1, 32, 32]
    classes = torch.tensor([b[1] for b in boxes], dtype=torch.long)  # [M]
    return digits, classes


def box_digit_accuracy(images: Tensor, layouts: Sequence[Sequence[tuple[int, float, float, float, float]]],
                       judge: nn.Module) -> float:
    """Share of requested boxes in which ``judge`` sees the requested digit (see ``crop_boxes``).

    ``judge`` maps ``[B, 1, 32, 32]`` digits in [-1, 1] to 10 logits (``evaluation.classifier``).
    """
    digits, classes = crop_boxes(images, layouts)
    if len(classes) == 0:
        raise ValueError("box_digit_accuracy needs at least one box in the layouts")
    pred = predict(judge, digits)
    return float((pred == classes).to(torch.float64).mean())


def segmap_iou(images: Tensor, segmaps: Tensor, threshold: float = 0.0) -> float:
    """Mean over images of IoU(requested ink ``segmaps > 0``, sample ink ``pixels > threshold``).

    ``images [N, C, H, W]`` in [-1, 1] (channels averaged), ``segmaps [N, H, W]`` integer class maps with
    0 for background. ``threshold`` 0 is the middle of the range, the ink level ``data.canvases`` uses for
    its maps, so real canvases score exactly 1. An image where both are empty counts as 1.
    """
    grey = _check_images(images)  # [N, H, W]
    if segmaps.ndim != 3 or segmaps.shape != grey.shape:
        raise ValueError(f"segmaps must be [N, H, W] = {tuple(grey.shape)} to match the images, "
                         f"got {tuple(segmaps.shape)}")
    if segmaps.dtype.is_floating_point:
        raise ValueError(f"segmaps must hold integer class ids, got dtype {segmaps.dtype}")
    if grey.shape[0] == 0:
        raise ValueError("segmap_iou needs at least one image")
    wanted = (segmaps > 0).flatten(1).to(grey.device)  # [N, H * W]
    ink = (grey > threshold).flatten(1)  # [N, H * W]
    inter = (wanted & ink).sum(1).to(torch.float64)  # [N]
    union = (wanted | ink).sum(1).to(torch.float64)  # [N]
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return float(iou.mean())
