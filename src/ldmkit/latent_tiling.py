"""Tiled encoding and decoding: the first stage applied to overlapping tiles, blended without seams.

A convolutional decoder run on one tile at a time needs memory for one tile, not the whole image. Two things
make a tile's output differ from the same region of the whole decode:

1. zero padding at the tile's border, where the whole decode would have seen the neighbours: tiles overlap,
   and their outputs are averaged with weights that fall linearly to ~0 across each shared band, so no tile edge
   shows as a step;
2. GroupNorm, which normalises each channel group by its mean and variance over the *whole* feature map, here
   over one tile: a tile of sky and a tile of grass are each normalised by their own statistics, a low-frequency
   colour difference that the blending spreads out but does not remove (the mid-block attention, likewise, sees
   one tile). Larger tiles make it smaller. (Sharing
   statistics estimated on a shrunk copy of the latent, the other cheap option, halved the mean error on photos
   but made it five times worse on a canvas of small shapes, so it is not offered.)

`benchmarks/vae_decode.py` measures the time, the peak memory and the remaining difference from the whole decode.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def tile_layout(size: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """(origins, side) of the fewest equal tiles of side <= `tile` that cover [0, size) with neighbours sharing
    at least `overlap`: the tiles are spread evenly, so no tile is mostly overlap."""
    if size <= tile:
        return [0], size
    n = math.ceil((size - overlap) / (tile - overlap))
    side = math.ceil((size + (n - 1) * overlap) / n)
    return [round(i * (size - side) / (n - 1)) for i in range(n)], side


def _ramp(n: int, overlap: int, fade_in: bool, fade_out: bool) -> Tensor:
    """Blend weights along one tile axis: linear from ~0 to 1 over `overlap` at every edge shared with a
    neighbouring tile, 1 elsewhere (and at the image border, which no other tile covers)."""
    w = torch.ones(n)
    k = min(overlap, n // 2)
    if k > 0:
        up = (torch.arange(k) + 0.5) / k  # never 0, so the weights sum to > 0 everywhere
        if fade_in:
            w[:k] = up
        if fade_out:
            w[n - k :] = up.flip(0)
    return w


def tiled_apply(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale: float) -> Tensor:
    """Apply a convolutional map `fn` (output size = input size * `scale`) to overlapping tiles of `x`.

    Tiles are at most `tile` x `tile` input pixels (`tile_layout`), neighbours share at least `overlap` of
    them, and the outputs are averaged with linear ramps across each shared band. Exact for a map without
    spatial context (see the tests).
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile size {tile}), got {overlap}")
    b, _, h, w = x.shape
    unit = round(1 / scale) if scale < 1 else 1  # encoding: tiles on whole latent pixels (multiples of f)

    def layout(size: int) -> tuple[list[int], int]:
        starts, side = tile_layout(size // unit, tile // unit, overlap // unit)
        return [s * unit for s in starts], side * unit

    (ys, th), (xs, tw) = layout(h), layout(w)
    out: Tensor | None = None
    weight = torch.zeros(1, 1, round(h * scale), round(w * scale), device=x.device, dtype=x.dtype)
    o = round(overlap * scale)
    for y0 in ys:
        for x0 in xs:
            part = fn(x[:, :, y0 : y0 + th, x0 : x0 + tw])  # (B, C_out, th * scale, tw * scale)
            ph, pw = part.shape[-2:]
            oy, ox = round(y0 * scale), round(x0 * scale)
            wy = _ramp(ph, o, y0 > 0, y0 + th < h).to(part)
            wx = _ramp(pw, o, x0 > 0, x0 + tw < w).to(part)
            wt = wy[:, None] * wx[None, :]  # (ph, pw)
            if out is None:
                out = torch.zeros(b, part.shape[1], *weight.shape[-2:], device=part.device, dtype=part.dtype)
            out[:, :, oy : oy + ph, ox : ox + pw] += part * wt
            weight[:, :, oy : oy + ph, ox : ox + pw] += wt
    assert out is not None
    return out / weight
