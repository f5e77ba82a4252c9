"""The identity first stage (CompVis `IdentityFirstStage`): diffusion in pixel space, f = 1.

LDM's latent-vs-pixel comparison (Rombach et al. 2022, Sec. 4.1, Fig. 6) trains the same denoiser on the
pixels themselves ("LDM-1"). This module lets the rest of the package treat that case as one more first stage:
it has the KL autoencoder's interface (`encode` -> posterior, `decode`, `downsample_factor`, `latent_channels`,
a `config`), so `LatentCodec`, stage-2 training, sampling and checkpoints work unchanged.

Its posterior is a point mass at the image: a `DiagonalGaussianDistribution` flagged deterministic whose
log-variance half is also at the clamp floor (LOGVAR_MIN, std e^-15 ~ 3e-7). Code that rebuilds the
distribution from `.parameters` (the codec's tiled path, `encode_moments` -> `draw_latents`) therefore still
draws the image itself, to well under one 8-bit grey level. Pixel-space models use a latent scale factor of 1:
the images are already in [-1, 1], the range the noise schedule assumes (set `scale_factor: 1.0`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .autoencoder_kl import AutoencoderConfig, FirstStage
from .distributions import LOGVAR_MIN, DiagonalGaussianDistribution


def identity_config(channels: int = 1, resolution: int = 32) -> AutoencoderConfig:
    """The AutoencoderConfig of an identity first stage for `channels`-channel images (f = 1)."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    return AutoencoderConfig(kind="identity", z_channels=channels, resolution=resolution, in_channels=channels,
                             out_ch=channels, ch=channels, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(),
                             embed_dim=channels, double_z=False)


class IdentityFirstStage(FirstStage):
    """x -> x: the 'autoencoder' of a pixel-space diffusion model; it has nothing to train."""

    def __init__(self, config: AutoencoderConfig | None = None) -> None:
        super().__init__()
        config = identity_config() if config is None else config
        if config.kind != "identity":
            raise ValueError(f"IdentityFirstStage needs an AutoencoderConfig of kind 'identity', got {config.kind!r}")
        self.config = config
        # The package finds a first stage's device from its first parameter (next(ae.parameters())), and a
        # module without any would raise StopIteration there: one empty, frozen parameter follows .to(device).
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    @property
    def downsample_factor(self) -> int:
        return 1

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """Image (B, C, H, W) -> a point-mass posterior at the image, parameters (B, 2C, H, W) = [x | LOGVAR_MIN]."""
        self._check_image(x)
        logvar = torch.full_like(x, LOGVAR_MIN)
        return DiagonalGaussianDistribution(torch.cat([x, logvar], dim=1), deterministic=True)

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, C, H, W) -> the same tensor: the latent is the image."""
        if z.dim() != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"IdentityFirstStage.decode expects a (B, {self.config.embed_dim}, H, W) latent, "
                             f"got shape {tuple(z.shape)}")
        return z

    def forward(self, x: Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussianDistribution]:
        """(reconstruction, posterior) as AutoencoderKL.forward; the reconstruction is x itself."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode()), posterior
