"""Random inpainting masks: binary, area within bounds, reproducible, and the kinds look different."""

from __future__ import annotations

import pytest
import torch

from ldmkit.data.masks import MASK_KINDS, box_mask, random_mask, stroke_mask


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _is_rectangle(m: torch.Tensor) -> bool:
    """A [H, W] mask is one filled axis-aligned rectangle iff its ones fill their bounding box."""
    rows = m.any(1).nonzero().flatten()
    cols = m.any(0).nonzero().flatten()
    if rows.numel() == 0:
        return False
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    return int(m.sum()) == int(box)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize(("h", "w"), [(32, 32), (64, 64), (32, 48)])
def test_binary_shape_and_area(kind: str, h: int, w: int) -> None:
    m = random_mask(kind, 64, h, w, generator=_gen(0))
    assert m.shape == (64, 1, h, w) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    area = m.mean(dim=(1, 2, 3))  # [B] hole share
    assert area.min() >= 0.05 and area.max() <= 0.6, (area.min(), area.max())


def test_custom_area_bounds() -> None:
    for kind in MASK_KINDS:
        area = random_mask(kind, 32, 32, 32, generator=_gen(1), min_area=0.2, max_area=0.3).mean(dim=(1, 2, 3))
        assert area.min() >= 0.2 and area.max() <= 0.3


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_deterministic(kind: str) -> None:
    a = random_mask(kind, 16, 32, 32, generator=_gen(3))
    b = random_mask(kind, 16, 32, 32, generator=_gen(3))
    c = random_mask(kind, 16, 32, 32, generator=_gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_masks_differ_within_a_batch() -> None:
    for m in (box_mask(8, 32, 32, generator=_gen(0)), stroke_mask(8, 32, 32, generator=_gen(0))):
        assert len({tuple(v.flatten().tolist()) for v in m}) == 8


def test_box_masks_are_rectangles_with_side_shares() -> None:
    m = box_mask(64, 64, 48, generator=_gen(0), min_frac=0.25, max_frac=0.75)[:, 0]  # [B, H, W]
    assert all(_is_rectangle(v) for v in m)
    heights = m.any(2).sum(1).float() / 64  # [B] share of H
    widths = m.any(1).sum(1).float() / 48
    for share in (heights, widths):
        assert share.min() >= 0.24 and share.max() <= 0.76
    area = m.float().mean(dim=(1, 2))
    assert area.min() >= 0.25**2 - 0.01 and area.max() <= 0.75**2 + 0.01


def test_kinds_differ() -> None:
    """Strokes are almost never a single rectangle; boxes always are; mixed has both, about half each."""
    boxes = random_mask("box", 100, 64, 64, generator=_gen(0))[:, 0]
    strokes = random_mask("stroke", 100, 64, 64, generator=_gen(0))[:, 0]
    mixed = random_mask("mixed", 100, 64, 64, generator=_gen(0))[:, 0]
    assert all(_is_rectangle(v) for v in boxes)
    assert sum(_is_rectangle(v) for v in strokes) <= 5
    n_rect = sum(_is_rectangle(v) for v in mixed)
    assert 30 <= n_rect <= 70, n_rect


def test_strokes_are_thick() -> None:
    """Thick brushes: most hole pixels sit inside a 3x3 block of hole pixels (1 px lines would not)."""
    m = stroke_mask(32, 64, 64, generator=_gen(0))
    eroded = -torch.nn.functional.max_pool2d(-m, 3, stride=1, padding=1)  # 3x3 erosion
    assert eroded.sum() / m.sum() > 0.6


def test_stroke_mask_settings() -> None:
    one = stroke_mask(16, 64, 64, generator=_gen(0), max_strokes=1, max_vertices=1, min_area=0.0, max_area=1.0)
    many = stroke_mask(16, 64, 64, generator=_gen(0), max_strokes=5, max_vertices=5, min_area=0.0, max_area=1.0)
    assert one.mean() < many.mean()
    assert (one.flatten(1).sum(1) > 0).all()  # a stroke always leaves a hole


def test_empty_batch() -> None:
    assert random_mask("mixed", 0, 32, 32, generator=_gen(0)).shape == (0, 1, 32, 32)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda g: random_mask("circles", 2, 32, 32, generator=g), "unknown mask kind 'circles'"),
        (lambda g: random_mask("box", 2, 1, 32, generator=g), "at least 2x2"),
        (lambda g: random_mask("box", -1, 32, 32, generator=g), "batch size"),
        (lambda g: random_mask("box", 2, 32, 32, generator=g, min_area=0.5, max_area=0.4), "min_area"),
        (lambda g: box_mask(2, 32, 32, generator=g, min_frac=0.0), "min_frac"),
        (lambda g: box_mask(2, 32, 32, generator=g, min_frac=0.8, max_frac=0.5), "min_frac"),
        (lambda g: stroke_mask(2, 32, 32, generator=g, max_strokes=0), "max_strokes"),
        (lambda g: box_mask(2, 32, 32, generator=None), "torch.Generator"),
        (lambda g: random_mask("box", 2, 32, 32, generator=g, min_area=0.9, max_area=0.95), "could not draw"),
    ],
)
def test_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(_gen(0))
