"""Random inpainting masks ``[B, 1, H, W]`` in {0, 1}, where 1 marks the hole the model must fill.

An inpainting model only learns to fill the kinds of holes it was shown: rectangles teach large
coherent regions, thick free-form strokes teach irregular boundaries.  LaMa (Suvorov et al. 2022)
trains and evaluates on a mix of both; ``stroke_mask`` follows its "thick" irregular generator
(``make_random_irregular_mask`` in ``saicinpainting/training/data/masks.py`` of advimman/lama, settings
from ``configs/data_gen/random_thick_256.yaml``), scaled from 256 px to the image's short side ``s``:

======================= ================================== ==========================================
setting                 LaMa thick, 256 px                 here
======================= ================================== ==========================================
strokes per mask        ``randint(1, 5)``                  same (more are added while the area is short)
segments per stroke     ``1 + randint(0, 4)``              same
segment length          ``10 + randint(0, 199)`` px        ``U(10/256, 210/256) * s``
brush width             ``5 + randint(0, 99)`` px          ``U(5/256, 105/256) * s``, at least 2 px
segment angle           ``0.01 + randint(0, 3)`` rad,      ``U(0, 2 pi)``
                        mirrored on every other stroke
end points              clipped to the image               same
hole area               masks over 50 % dropped            redrawn unless in ``[min_area, max_area]``
======================= ================================== ==========================================

Departures: the angle is continuous (LaMa's integer radians give only eight directions, an artefact
rather than a design); brushes are at least 2 px wide, because at 32 px the scaled minimum (0.6 px)
would make thin, not thick, strokes; every segment gets round caps (a disc of the brush width at each
joint), as cv2's thick lines have, so polylines have no notches at their joints.

``box_mask`` draws one rectangle per image (LaMa's box generator draws 1-3 of 30-150 px with a 10 px
margin; one box covering 25-75 % of each side gives a hole of 6-56 % of the image).  ``random_mask``
picks a kind by name and keeps every hole area within ``[min_area, max_area]`` (default 5-60 %) by
redrawing, so no mask is empty or covers the whole image.  All draws come from the caller's
``torch.Generator``, image by image, so masks are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["MASK_KINDS", "box_mask", "random_mask", "stroke_mask"]

MASK_KINDS = ("box", "stroke", "mixed")

# LaMa "thick" irregular masks at 256 px, as fractions of the image side
_REF_SIDE = 256.0
_LEN_RANGE = (10 / _REF_SIDE, 210 / _REF_SIDE)
_WIDTH_RANGE = (5 / _REF_SIDE, 105 / _REF_SIDE)
_MIN_WIDTH_PX = 2.0
_MAX_TRIES = 200  # redraws before giving up on an area window (a valid window needs a handful at most)
_MAX_EXTRA_STROKES = 20


def _uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64, device=g.device))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Integer uniform in ``[lo, hi]``, both ends included."""
    return int(torch.randint(lo, hi + 1, (), generator=g, device=g.device))


def _check_size(b: int, h: int, w: int, generator: torch.Generator) -> None:
    for name, v in (("b", b), ("h", h), ("w", w)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if b < 0:
        raise ValueError(f"batch size b must be >= 0, got {b}")
    if h < 2 or w < 2:
        raise ValueError(f"mask size must be at least 2x2, got {h}x{w}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _check_area(min_area: float, max_area: float) -> None:
    if not 0.0 <= min_area < max_area <= 1.0:
        raise ValueError(f"need 0 <= min_area < max_area <= 1, got min_area={min_area}, max_area={max_area}")


def _check_fracs(min_frac: float, max_frac: float) -> None:
    if not 0.0 < min_frac <= max_frac <= 1.0:
        raise ValueError(f"need 0 < min_frac <= max_frac <= 1, got min_frac={min_frac}, max_frac={max_frac}")


def _one_box(h: int, w: int, g: torch.Generator, min_frac: float, max_frac: float) -> Tensor:
    """One rectangle ``[H, W]`` bool with each side a ``U(min_frac, max_frac)`` share of the image side."""
    bh = min(h, max(1, round(_uniform(g, min_frac, max_frac) * h)))
    bw = min(w, max(1, round(_uniform(g, min_frac, max_frac) * w)))
    top = _randint(g, 0, h - bh)
    left = _randint(g, 0, w - bw)
    m = torch.zeros(h, w, dtype=torch.bool)
    m[top : top + bh, left : left + bw] = True
    return m


def _draw_stroke(draw: ImageDraw.ImageDraw, h: int, w: int, g: torch.Generator, max_vertices: int) -> None:
    """One LaMa-style polyline: random start, 1..max_vertices segments of random angle, length and width."""
    side = float(min(h, w))
    x, y = _uniform(g, 0, w - 1), _uniform(g, 0, h - 1)
    for _ in range(_randint(g, 1, max_vertices)):
        angle = _uniform(g, 0.0, 2.0 * math.pi)
        length = _uniform(g, *_LEN_RANGE) * side
        width = max(_MIN_WIDTH_PX, _uniform(g, *_WIDTH_RANGE) * side)
        # LaMa steps by (sin, cos) and clips the end point to the image; the next segment starts there
        x1 = min(max(x + length * math.sin(angle), 0.0), w - 1.0)
        y1 = min(max(y + length * math.cos(angle), 0.0), h - 1.0)
        draw.line([(x, y), (x1, y1)], fill=255, width=max(1, round(width)))
        r = width / 2.0
        for cx, cy in ((x, y), (x1, y1)):  # round caps, so joints have no notches
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        x, y = x1, y1


def _one_stroke_mask(
    h: int, w: int, g: torch.Generator, max_strokes: int, max_vertices: int, min_area: float
) -> Tensor:
    """``randint(1, max_strokes)`` strokes, plus more (up to a bound) while the hole is under ``min_area``."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(_randint(g, 1, max_strokes)):
        _draw_stroke(draw, h, w, g, max_vertices)
    for _ in range(_MAX_EXTRA_STROKES):
        if (np.asarray(canvas) > 127).mean() >= min_area:
            break
        _draw_stroke(draw, h, w, g, max_vertices)
    return torch.from_numpy(np.asarray(canvas) > 127)


def _within_area(draw_one: Callable[[], Tensor], min_area: float, max_area: float, what: str) -> Tensor:
    """Redraw until the hole covers a share of the image in ``[min_area, max_area]`` (rejection sampling)."""
    for _ in range(_MAX_TRIES):
        m = draw_one()
        if min_area <= m.float().mean().item() <= max_area:
            return m
    raise ValueError(
        f"could not draw a {what} mask with hole area in [{min_area}, {max_area}] in {_MAX_TRIES} tries; "
        "widen the area bounds or change the shape settings"
    )


def _stack(masks: list[Tensor], h: int, w: int) -> Tensor:
    if not masks:
        return torch.zeros(0, 1, h, w)
    return torch.stack(masks)[:, None].float()  # B x [H, W] -> [B, 1, H, W]


def box_mask(
    b: int, h: int, w: int, *, generator: torch.Generator, min_frac: float = 0.25, max_frac: float = 0.75
) -> Tensor:
    """One random axis-aligned rectangle per image: ``[B, 1, H, W]`` float in {0, 1}, 1 = hole.

    Height and width are independent ``U(min_frac, max_frac)`` shares of the image sides (rounded, at
    least 1 px) and the position is uniform over the places the box fits, so the box may touch the
    border.  The defaults give holes of 6-56 % of the image.
    """
    _check_size(b, h, w, generator)
    _check_fracs(min_frac, max_frac)
    return _stack([_one_box(h, w, generator, min_frac, max_frac) for _ in range(b)], h, w)


def stroke_mask(
    b: int,
    h: int,
    w: int,
    *,
    generator: torch.Generator,
    max_strokes: int = 5,
    max_vertices: int = 5,
    min_area: float = 0.05,
    max_area: float = 0.6,
) -> Tensor:
    """LaMa-style thick irregular strokes: ``[B, 1, H, W]`` float in {0, 1}, 1 = hole.

    Each image gets ``randint(1, max_strokes)`` polylines of ``1..max_vertices`` segments with random
    angle, length and brush width scaled to the short side (see the module docstring for the settings
    and their LaMa origin).  Strokes are added while the hole covers less than ``min_area`` of the
    image, and a mask over ``max_area`` is redrawn from scratch.
    """
    _check_size(b, h, w, generator)
    _check_area(min_area, max_area)
    if max_strokes < 1 or max_vertices < 1:
        raise ValueError(f"max_strokes and max_vertices must be >= 1, got {max_strokes} and {max_vertices}")

    def one() -> Tensor:
        return _one_stroke_mask(h, w, generator, max_strokes, max_vertices, min_area)

    return _stack([_within_area(one, min_area, max_area, "stroke") for _ in range(b)], h, w)


def random_mask(
    kind: str,
    b: int,
    h: int,
    w: int,
    *,
    generator: torch.Generator,
    min_area: float = 0.05,
    max_area: float = 0.6,
) -> Tensor:
    """Masks of one ``kind`` in ``MASK_KINDS``: ``[B, 1, H, W]`` float in {0, 1}, 1 = hole.

    ``"box"`` and ``"stroke"`` are ``box_mask`` and ``stroke_mask`` with their defaults; ``"mixed"``
    picks box or stroke per image with probability 1/2 each.  Every hole covers a share of the image in
    ``[min_area, max_area]`` (masks outside are redrawn), so none is empty or the whole image.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {', '.join(MASK_KINDS)}")
    _check_size(b, h, w, generator)
    _check_area(min_area, max_area)

    def box() -> Tensor:
        return _one_box(h, w, generator, 0.25, 0.75)

    def strokes() -> Tensor:
        return _one_stroke_mask(h, w, generator, 5, 5, min_area)

    masks = []
    for _ in range(b):
        use_box = kind == "box" or (kind == "mixed" and _uniform(generator) < 0.5)
        masks.append(_within_area(box if use_box else strokes, min_area, max_area, "box" if use_box else "stroke"))
    return _stack(masks, h, w)
