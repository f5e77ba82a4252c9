"""KL-regularised first-stage autoencoder (Rombach et al. 2022, Sec. 3.1 and App. G).

x -> Encoder -> quant_conv -> q(z|x) = N(mean, diag(var)) -> z -> post_quant_conv -> Decoder -> x_rec.
Submodule names (``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``) follow CompVis
``AutoencoderKL``, so a reference ``first_stage_model.*`` state dict loads after stripping the prefix.
The training loss (LPIPS + patch discriminator) lives elsewhere; this module holds only the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ldmkit.models.ae_modules import ATTN_TYPES, Decoder, Encoder
from ldmkit.models.distributions import DiagonalGaussianDistribution


@dataclass
class AutoencoderConfig:
    """The CompVis ``ddconfig`` plus ``embed_dim`` (and ``n_embed`` etc. for VQ). Required fields have no default."""

    z_channels: int  # channels of the encoder/decoder bottleneck (before quant_conv / after post_quant_conv)
    resolution: int  # nominal image size; only decides at which feature sizes attention is placed
    in_channels: int  # image channels fed to the encoder
    out_ch: int  # image channels produced by the decoder
    ch: int  # base channel width of the ResNet trunk
    ch_mult: tuple[int, ...]  # width multiplier per level; len(ch_mult) - 1 downsamplings
    num_res_blocks: int  # ResnetBlocks per encoder level (decoder uses one more)
    attn_resolutions: tuple[int, ...]  # feature-map sizes (pixels) that get an AttnBlock
    embed_dim: int  # channels of the latent z that the diffusion model sees
    double_z: bool = True  # encoder emits mean and logvar; True for the KL model, False for VQ
    dropout: float = 0.0  # dropout inside ResnetBlocks
    attn_type: str = "vanilla"  # "vanilla" (AttnBlock) or "none" (no attention at all)
    extra: dict[str, Any] = field(default_factory=dict)  # other ddconfig keys (e.g. tanh_out)
    # Which first stage: "kl" (AutoencoderKL), "vq" (VQModel, see models/vq.py) or "identity" (pixel space,
    # f = 1: IdentityFirstStage, see models/identity.py). The fields below are VQ-only and never reach
    # Encoder/Decoder.
    kind: str = "kl"
    n_embed: int | None = None  # VQ codebook size K; required for kind "vq"
    beta: float = 0.25  # VQ commitment weight (van den Oord et al. 2017, eq. 3)
    legacy: bool = True  # VQ: the reference's beta placement (on the codebook term); see VectorQuantizer
    ema_decay: float | None = None  # VQ: update the codebook by EMA with this decay instead of by gradient
    restart_dead_codes: int | None = None  # VQ: re-seed codes left unused for this many training steps

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.kind not in FIRST_STAGE_KINDS:
            raise ValueError(f"kind must be one of {FIRST_STAGE_KINDS}, got {self.kind!r}")
        if self.kind == "kl":
            if not self.double_z:
                raise ValueError("AutoencoderKL needs double_z=True: the encoder must emit mean and logvar")
            vq_only = [n for n in ("n_embed", "ema_decay", "restart_dead_codes") if getattr(self, n) is not None]
            if vq_only:
                raise ValueError(f"{', '.join(vq_only)} only apply to kind 'vq', not to the KL autoencoder")
        elif self.kind == "identity":
            self._check_identity()
        else:
            self._check_vq()
        if len(self.ch_mult) == 0:
            raise ValueError("ch_mult must have at least one level")
        if self.attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {self.attn_type!r}")

    def _check_identity(self) -> None:
        # the latent is the image: same channels in and out, and no downsampling level (f = 1)
        if not self.in_channels == self.out_ch == self.embed_dim:
            raise ValueError(f"kind 'identity' needs in_channels == out_ch == embed_dim (the latent is the image), "
                             f"got {self.in_channels}, {self.out_ch}, {self.embed_dim}")
        if len(self.ch_mult) != 1:
            raise ValueError(f"kind 'identity' has f = 1: ch_mult must have one level, got {list(self.ch_mult)}")
        vq_only = [n for n in ("n_embed", "ema_decay", "restart_dead_codes") if getattr(self, n) is not None]
        if vq_only:
            raise ValueError(f"{', '.join(vq_only)} only apply to kind 'vq', not to the identity first stage")

    def _check_vq(self) -> None:
        # The reference VQ configs set double_z: false; True would give quant_conv the wrong input width.
        if self.double_z:
            raise ValueError("VQModel needs double_z=False: the encoder emits z_channels, not mean and logvar")
        if self.n_embed is None or self.n_embed < 1:
            raise ValueError(f"kind 'vq' needs a codebook size n_embed >= 1, got {self.n_embed!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if self.restart_dead_codes is not None and self.restart_dead_codes < 1:
            raise ValueError(f"restart_dead_codes must be >= 1 steps, got {self.restart_dead_codes}")

    @classmethod
    def from_ddconfig(cls, ddconfig: Mapping[str, Any], embed_dim: int, **options: Any) -> AutoencoderConfig:
        """Build from a CompVis-style ``ddconfig`` mapping (unknown keys are kept in ``extra``).

        ``options`` are the non-ddconfig fields, e.g. ``kind="vq", n_embed=8192`` for a VQ first stage.
        """
        known = {f for f in cls.__dataclass_fields__ if f not in _NON_DDCONFIG_FIELDS}
        kwargs = {k: v for k, v in ddconfig.items() if k in known}
        extra = {k: v for k, v in ddconfig.items() if k not in known}
        return cls(**kwargs, embed_dim=embed_dim, extra=extra, **options)

    def ddconfig(self) -> dict[str, Any]:
        """Keyword arguments for :class:`Encoder` / :class:`Decoder`."""
        d = asdict(self)
        extra = d.pop("extra")
        for name in _NON_DDCONFIG_FIELDS:
            d.pop(name, None)
        return {**d, **extra}


FIRST_STAGE_KINDS = ("kl", "vq", "identity")
# AutoencoderConfig fields that are not Encoder/Decoder arguments.
_NON_DDCONFIG_FIELDS = ("embed_dim", "extra", "kind", "n_embed", "beta", "legacy", "ema_decay", "restart_dead_codes")


class FirstStage(nn.Module):
    """What KL and VQ first stages share: the factor f, the latent width, and the input checks."""

    config: AutoencoderConfig

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction f: an (H, W) image maps to an (H/f, W/f) latent."""
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the diffusion model sees (``embed_dim``)."""
        return self.config.embed_dim

    def _check_image(self, x: Tensor) -> None:
        f, name = self.downsample_factor, type(self).__name__
        if x.dim() != 4:
            raise ValueError(f"{name}.encode expects a (B, C, H, W) image batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"{name}.encode expects {self.config.in_channels} input channels, "
                f"got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        h, w = x.shape[-2:]
        if h % f != 0 or w % f != 0:
            raise ValueError(
                f"{name}.encode needs height and width divisible by the downsampling factor {f}, got {h}x{w}"
            )


class AutoencoderKL(FirstStage):
    """Encoder/decoder pair with a diagonal-Gaussian posterior over a ``(embed_dim, H/f, W/f)`` latent."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        if config.kind != "kl":
            raise ValueError(f"AutoencoderKL needs a config of kind 'kl', got {config.kind!r} (use VQModel)")
        self.config = config
        dd = config.ddconfig()
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        # 1x1 convs between the trunk's bottleneck width and the latent width embed_dim.
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """Image (B, in_channels, H, W) -> posterior q(z | x) over (B, embed_dim, H/f, W/f)."""
        self._check_image(x)
        h = self.encoder(x)  # (B, 2*z_channels, H/f, W/f)
        moments = self.quant_conv(h)  # (B, 2*embed_dim, H/f, W/f) = [mean | logvar]
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f)."""
        if z.dim() != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"AutoencoderKL.decode expects a (B, {self.config.embed_dim}, h, w) latent, "
                f"got shape {tuple(z.shape)}"
            )
        z = self.post_quant_conv(z)  # (B, z_channels, h, w)
        return self.decoder(z)  # (B, out_ch, h*f, w*f)

    def forward(
        self,
        x: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``x`` through a posterior sample (or its mode); returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, embed_dim, h, w)
        return self.decode(z), posterior
