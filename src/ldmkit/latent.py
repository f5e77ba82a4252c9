"""The pixel <-> latent boundary (LDM sec. 3.1): a first-stage autoencoder plus the latent scale factor.

Diffusion runs on z = scale_factor * E(x). The scale factor makes the latents roughly unit-variance, which
the noise schedule assumes; LDM estimates it as 1 / std of the first training batch's latents
(`scale_by_std`), Stable Diffusion ships 0.18215 for its kl-f8 autoencoder. This object owns that constant:
nothing else in the package multiplies or divides by it.

It also owns how large images cross the boundary within a memory budget: `enable_slicing` decodes a batch a few
images at a time, `enable_tiling` decodes (and encodes) overlapping spatial tiles (`latent_tiling.py`), so that
the decoder's peak memory depends on the tile, not the image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .diffusion.noise import Generators
from .latent_tiling import tiled_apply
from .models.autoencoder_kl import AutoencoderKL
from .models.distributions import DiagonalGaussianDistribution
from .models.identity import IdentityFirstStage
from .models.vq import VQModel


def estimate_scale_factor(latents: Tensor) -> float:
    """1 / std of a batch of unscaled latents (LDM `scale_by_std`: std over every element)."""
    std = latents.detach().flatten().float().std().item()
    if not std > 0 or std != std:
        raise ValueError(f"cannot estimate a latent scale factor: latent std is {std}")
    return 1.0 / std


class LatentCodec(nn.Module):
    """Encode images to scaled latents and decode them back."""

    def __init__(self, autoencoder: AutoencoderKL | VQModel | IdentityFirstStage, scale_factor: float = 1.0) -> None:
        super().__init__()
        if not scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {scale_factor}")
        self.autoencoder = autoencoder
        self.scale_factor = float(scale_factor)
        self.tile_size: int | None = None  # latent pixels per tile side; None decodes the whole latent at once
        self.tile_overlap = 0
        self.slice_size: int | None = None  # images per decoder call; None = the whole batch

    def enable_tiling(self, tile_size: int = 64, overlap: int = 16) -> None:
        """Encode and decode in overlapping tiles of at most `tile_size` latent pixels a side (64 = 512 px at
        f = 8), neighbours sharing at least `overlap` (see `latent_tiling`)."""
        if tile_size < 2 or not 0 <= overlap < tile_size:
            raise ValueError(f"tiling needs tile_size >= 2 and 0 <= overlap < tile_size, got {tile_size}, {overlap}")
        self.tile_size, self.tile_overlap = int(tile_size), int(overlap)

    def disable_tiling(self) -> None:
        self.tile_size = None

    def enable_slicing(self, slice_size: int = 1) -> None:
        """Decode `slice_size` images per decoder call: peak memory grows with the slice, not the batch."""
        if slice_size < 1:
            raise ValueError(f"slice_size must be >= 1, got {slice_size}")
        self.slice_size = int(slice_size)

    def disable_slicing(self) -> None:
        self.slice_size = None

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        f = self.downsample_factor
        if resolution % f:
            raise ValueError(f"resolution {resolution} is not divisible by the downsampling factor {f}")
        return (self.latent_channels, resolution // f, resolution // f)

    def posterior(self, x: Tensor) -> DiagonalGaussianDistribution:
        """q(z | x) over unscaled latents (tile by tile when tiling is on and the image is larger than a tile)."""
        ae = self.autoencoder
        assert not isinstance(ae, VQModel), "a VQ first stage has no posterior: its callers use encode"
        if not self._tiles(x.shape[-2:], self.downsample_factor):
            return ae.encode(x)
        deterministic: list[bool] = []

        def moments(xt: Tensor) -> Tensor:
            post = ae.encode(xt)
            deterministic.append(post.deterministic)
            return post.parameters  # (B, 2C, h, w): [mean | logvar]

        params = self._encoded(moments, x)
        return DiagonalGaussianDistribution(params, deterministic=deterministic[0])

    def _tiles(self, size: tuple[int, ...], f: int) -> bool:
        return self.tile_size is not None and max(size) > self.tile_size * f

    def _encoded(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        f = self.downsample_factor
        if not self._tiles(x.shape[-2:], f):
            return fn(x)
        assert self.tile_size is not None  # _tiles is False without tiling
        return tiled_apply(fn, x, self.tile_size * f, self.tile_overlap * f, 1 / f)  # (B, C, H/f, W/f)

    def scale(self, z: Tensor) -> Tensor:
        return z * self.scale_factor

    def encode(self, x: Tensor, generator: Generators = None) -> Tensor:
        """Scaled latent z = s * (mean + std * noise), as LDM's `get_first_stage_encoding`; for a VQ first
        stage the deterministic pre-quantisation latent (LDM's VQModelInterface.encode). The noise comes from
        `generator`, or one generator per image (`diffusion.noise.randn`)."""
        if isinstance(self.autoencoder, VQModel):
            return self.scale(self._encoded(self.autoencoder.encode, x))
        return self.scale(self.posterior(x).sample(generator))

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> image (a VQ first stage quantises the latent first, as LDM's decode_first_stage).

        With slicing on, `slice_size` images per decoder call; with tiling on, latents larger than one tile go
        through `tiled_apply`.
        """
        z = z / self.scale_factor
        parts = z.split(self.slice_size) if self.slice_size else (z,)
        return torch.cat([self._decode_unscaled(p) for p in parts])

    def _decode_unscaled(self, z: Tensor) -> Tensor:
        # a VQ decoder snaps each latent position to its nearest code, so tiles see the same codes as the whole
        if not self._tiles(z.shape[-2:], 1):
            return self.autoencoder.decode(z)
        assert self.tile_size is not None  # _tiles is False without tiling
        return tiled_apply(self.autoencoder.decode, z, self.tile_size, self.tile_overlap, self.downsample_factor)
