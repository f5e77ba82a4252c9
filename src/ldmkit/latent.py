"""The pixel <-> latent boundary (LDM sec. 3.1): a first-stage autoencoder plus the latent scale factor.

Diffusion runs on z = scale_factor * E(x). The scale factor makes the latents roughly unit-variance, which
the noise schedule assumes; LDM estimates it as 1 / std of the first training batch's latents
(`scale_by_std`), Stable Diffusion ships 0.18215 for its kl-f8 autoencoder. This object owns that constant:
nothing else in the package multiplies or divides by it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .models.autoencoder_kl import AutoencoderKL
from .models.distributions import DiagonalGaussianDistribution
from .models.vq import VQModel


def estimate_scale_factor(latents: Tensor) -> float:
    """1 / std of a batch of unscaled latents (LDM `scale_by_std`: std over every element)."""
    std = latents.detach().flatten().float().std().item()
    if not std > 0 or std != std:
        raise ValueError(f"cannot estimate a latent scale factor: latent std is {std}")
    return 1.0 / std


class LatentCodec(nn.Module):
    """Encode images to scaled latents and decode them back."""

    def __init__(self, autoencoder: AutoencoderKL | VQModel, scale_factor: float = 1.0) -> None:
        super().__init__()
        if not scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {scale_factor}")
        self.autoencoder = autoencoder
        self.scale_factor = float(scale_factor)

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
        """q(z | x) over unscaled latents."""
        return self.autoencoder.encode(x)

    def scale(self, z: Tensor) -> Tensor:
        return z * self.scale_factor

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latent z = s * (mean + std * noise), as LDM's `get_first_stage_encoding`; for a VQ first
        stage the deterministic pre-quantisation latent (LDM's VQModelInterface.encode)."""
        if isinstance(self.autoencoder, VQModel):
            return self.scale(self.autoencoder.encode(x))
        return self.scale(self.posterior(x).sample(generator))

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> image (a VQ first stage quantises the latent first, as LDM's decode_first_stage)."""
        return self.autoencoder.decode(z / self.scale_factor)
