"""Row-banded inference for the autoencoder's large feature maps: conv3x3(act(norm(x))) and conv3x3(up2(x))
computed a band of rows at a time, so the full-size intermediate (the normalised map, or the 4x larger
upsampled one) never exists.

At 512 px the SD decoder's finest level holds 256-channel maps of 512 x 512 (268 MB each in fp32). The
plain forward keeps the input, its GroupNorm output and the conv output alive together; upsampling keeps
the input, the nearest-upsampled copy and the conv output. Banding leaves input + output + one band, which
is what decides the decoder's peak memory (and with it the whole text-to-image job's, `benchmarks/`
`sd_sampling_memory.py`). Tiled decoding (`latent_tiling.py`) changes the result at tile seams; banding
does not: a 3x3 conv of a band with one halo row above and below is the same sum as the conv of the whole
map, and GroupNorm's statistics are taken over the whole map before any band is normalised. Only the
summation order inside the kernels may differ (float rounding, ~1e-6).

Used only without autograd (it writes into a preallocated output) and only for maps of at least
`MIN_PIXELS` positions, so small maps (and training) take the plain, bit-identical path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MIN_PIXELS", "BANDS", "use_bands", "norm_act_conv", "upsample_conv", "add_conv1x1"]

MIN_PIXELS = 256 * 256  # H * W from which a map is banded (the top levels of a >= 512 px decode)
BANDS = 8  # bands per map: each band's temporaries are ~1/8 of a full-size map


def use_bands(x: Tensor, upsample: int = 1) -> bool:
    """Band this map (upsampled `upsample` times each way)? Only without autograd, and only for large maps."""
    return not torch.is_grad_enabled() and x.ndim == 4 and x.shape[-2] * x.shape[-1] * upsample**2 >= MIN_PIXELS


def _conv3x3_by_rows(conv: nn.Conv2d, rows_of_input: Callable[[int, int], Tensor], height: int,
                     width: int, batch: int, like: Tensor) -> Tensor:
    """A 3x3, stride-1, padding-1 conv of a `height`-row map whose rows a..b-1 `rows_of_input(a, b)` makes.

    Each output band r0..r1-1 needs input rows r0-1..r1 (one halo row each side); past the map's edge those
    are the conv's zero padding, added here by hand since the conv pads only the width.
    """
    if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1:
        raise ValueError(f"banded conv needs a plain 3x3 conv with stride 1 and padding 1, got {conv}")
    rows = -(-height // BANDS)
    out = like.new_empty(batch, conv.out_channels, height, width)  # (B, C_out, H, W)
    if like.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    for r0 in range(0, height, rows):
        r1 = min(r0 + rows, height)
        a, b = max(r0 - 1, 0), min(r1 + 1, height)
        band = rows_of_input(a, b)  # (B, C_in, b - a, W)
        band = F.pad(band, (0, 0, int(r0 == 0), int(r1 == height)))  # (B, C_in, r1 - r0 + 2, W)
        out[:, :, r0:r1] = F.conv2d(band, conv.weight, conv.bias, padding=(0, 1))  # (B, C_out, r1 - r0, W)
    return out


def norm_act_conv(norm: nn.GroupNorm, conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv(SiLU(GroupNorm(x))) by row bands; GroupNorm's per-(sample, group) mean and variance come from
    the whole map first (Wu & He 2018, Eq. 1: x_hat = (x - mu) / sqrt(sigma^2 + eps) over each group)."""
    b, c, h, w = x.shape
    g = norm.num_groups
    if x.is_contiguous():
        var, mean = torch.var_mean(x.view(b, g, c // g * h * w), dim=-1, unbiased=False)  # (B, G) each
    else:  # channels_last: a group view would copy the map; combine per-channel moments instead (in fp64)
        var_c, mean_c = (t.double().view(b, g, c // g) for t in torch.var_mean(x, dim=(2, 3), unbiased=False))
        mean = mean_c.mean(-1)  # (B, G)
        var = ((var_c + mean_c**2).mean(-1) - mean**2).clamp_min(0).to(x.dtype)
        mean = mean.to(x.dtype)
    rstd = (var + norm.eps).rsqrt()
    # fold the normalisation and the affine into one scale and shift per (sample, channel)
    gamma = norm.weight.reshape(1, g, c // g) if norm.affine else x.new_ones(1, g, c // g)
    beta = norm.bias.reshape(1, c) if norm.affine else x.new_zeros(1, c)
    scale = (gamma * rstd[:, :, None]).reshape(b, c)  # (B, C)
    shift = beta - (scale.reshape(b, g, c // g) * mean[:, :, None]).reshape(b, c)  # (B, C)

    def rows(a: int, z: int) -> Tensor:
        band = torch.addcmul(shift[:, :, None, None], x[:, :, a:z], scale[:, :, None, None])  # (B, C, z-a, W)
        return F.silu(band, inplace=True)

    return _conv3x3_by_rows(conv, rows, h, w, b, x)


def upsample_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv(nearest_upsample_x2(x)) by row bands: output row r reads input row r // 2."""
    b, _, h, w = x.shape

    def rows(a: int, z: int) -> Tensor:
        src = x[:, :, a // 2 : (z - 1) // 2 + 1]  # input rows covering upsampled rows a..z-1
        up = F.interpolate(src, scale_factor=2.0, mode="nearest")  # (B, C, 2 * rows, 2W)
        return up[:, :, a - 2 * (a // 2) : a - 2 * (a // 2) + (z - a)]  # (B, C, z - a, 2W)

    return _conv3x3_by_rows(conv, rows, 2 * h, 2 * w, b, x)


def add_conv1x1(out: Tensor, conv: nn.Conv2d, x: Tensor) -> Tensor:
    """out += conv1x1(x), by row bands: the 1x1 shortcut of a ResnetBlock that changes width. Done whole, oneDNN
    copies x into its blocked layout first (at 2+ threads), a full-size temporary at the decoder's peak."""
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.groups != 1:
        raise ValueError(f"banded shortcut needs a plain 1x1 conv, got {conv}")
    height = x.shape[-2]
    rows = -(-height // BANDS)
    for r0 in range(0, height, rows):
        out[:, :, r0 : r0 + rows] += F.conv2d(x[:, :, r0 : r0 + rows], conv.weight, conv.bias)  # (B, C_out, rows, W)
    return out
