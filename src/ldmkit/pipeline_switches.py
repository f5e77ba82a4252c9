"""Speed and memory switches of the inference pipeline, each measured in benchmarks/ (README, Performance).

None changes what is computed beyond float rounding, except VAE tiling, whose cost in quality
`latent_tiling.py` describes. The pipeline inherits them; they only touch its UNet (`parts.unet`) and its
latent codec (`codec`).
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from .latent import LatentCodec
from .training.build import LDMParts

S = TypeVar("S", bound="SpeedSwitches")


class SpeedSwitches:
    """Methods that switch how the pipeline's UNet and autoencoder run; each returns the pipeline."""

    parts: LDMParts
    codec: LatentCodec

    def enable_vae_tiling(self: S, tile_size: int | None = None, overlap: int | None = None) -> S:
        """Decode (and encode) large images in overlapping tiles of `tile_size` latent pixels (default: 512 px
        worth, 64 at f = 8; overlap a quarter of it): the decoder's memory then follows the tile, not the image.
        Images no larger than a tile decode exactly as before. See `LatentCodec.enable_tiling`."""
        t = tile_size if tile_size is not None else max(8, 512 // self.codec.downsample_factor)
        self.codec.enable_tiling(t, overlap if overlap is not None else t // 4)
        return self

    def enable_attention_slicing(self: S, slice_size: int | None = 1) -> S:
        """Attend over `slice_size` (batch, head) maps at a time (None: all at once). Memory for backends that
        build the full attention matrix; torch's CPU and flash kernels never do, so here it only costs time."""
        self.parts.unet.set_attention_slice(slice_size)
        return self

    def fuse_qkv_projections(self: S, fuse: bool = True) -> S:
        """Self-attention q, k, v in one matmul over the stacked weights (checkpoint keys unchanged)."""
        if fuse:
            self.parts.unet.fuse_qkv_projections()
        else:
            self.parts.unet.unfuse_qkv_projections()
        return self

    def to_channels_last(self: S) -> S:
        """UNet and autoencoder weights in channels_last (NHWC) memory format; same results."""
        for module in (self.parts.unet, self.codec):
            module.to(memory_format=torch.channels_last)
        return self

    def compile(self: S, **options: Any) -> S:
        """`torch.compile` the UNet in place (keys unchanged). The first call then compiles for minutes on a
        CPU; worth it for long GPU runs (see the README's GPU table), not for a few CPU samples."""
        self.parts.unet.compile(**{"dynamic": False, **options})
        return self

    def enable_vae_slicing(self: S, slice_size: int = 1) -> S:
        """Decode `slice_size` images per decoder call instead of the whole batch (same images, less memory)."""
        self.codec.enable_slicing(slice_size)
        return self

