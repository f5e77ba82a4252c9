"""VQ-regularised first stage (Rombach et al. 2022, Sec. 3.1; VQ-VAE, van den Oord et al. 2017; VQGAN).

x -> Encoder -> quant_conv -> h -> nearest codebook vector z_q -> post_quant_conv -> Decoder -> x_rec.
Names follow CompVis ``VQModel`` and taming ``VectorQuantizer2`` (``quantize.embedding.weight``), so a
reference ``first_stage_model.*`` state dict loads with ``strict=True`` after stripping the prefix.
LDM trains its diffusion model on the *pre-quantisation* latent h and quantises only when decoding
(``VQModelInterface``); :meth:`VQModel.encode` and :meth:`VQModel.decode` follow those semantics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ldmkit.models.ae_modules import Decoder, Encoder
from ldmkit.models.autoencoder_kl import AutoencoderConfig, FirstStage


class QuantizeInfo(NamedTuple):
    """Batch statistics of one quantisation. Unpacks as ``_, _, indices`` like the reference's info tuple."""

    perplexity: Tensor  # exp(entropy of the code histogram): the effective number of codes used
    usage: Tensor  # fraction of the K codes used at least once in the batch
    indices: Tensor  # (B*H*W,) int64 code per position, flattened in (b, h, w) order


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient (VQ-VAE, eq. 1-3).

    ``legacy=True`` reproduces taming's VectorQuantizer2 default, where beta ended up on the codebook
    term: loss = ||sg[z_q] - z||^2 + beta ||z_q - sg[z]||^2. ``legacy=False`` is eq. 3 as published,
    loss = ||sg[z] - z_q||^2 + beta ||z - sg[z_q]||^2.

    Options the reference does not have (both off by default, adding no state-dict keys then):
    ``ema_decay`` replaces the gradient codebook term by exponential moving averages of the assigned
    encoder outputs (VQ-VAE App. A.1); ``restart_dead_codes=N`` re-seeds codes unused for N training
    steps with encoder outputs of the current batch, drawn with a caller-supplied generator.
    """

    def __init__(
        self,
        n_e: int,  # codebook size K
        e_dim: int,  # code width D (= embed_dim)
        beta: float = 0.25,  # commitment weight
        legacy: bool = True,  # reference beta placement, see class docstring
        ema_decay: float | None = None,  # gamma of the EMA codebook; None = learn codes by gradient
        ema_eps: float = 1e-5,  # Laplace smoothing of the EMA cluster sizes
        restart_dead_codes: int | None = None,  # steps without use after which a code is re-seeded
    ) -> None:
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.ema_decay = ema_decay
        self.ema_eps = ema_eps
        self.restart_dead_codes = restart_dead_codes

        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)  # reference init
        if ema_decay is not None:
            # The codebook is then an average, not a trained parameter. Starting the averages at
            # N_i = 1, m_i = e_i keeps e_i = m_i / N_i from the first step on.
            self.embedding.weight.requires_grad_(False)
            self.ema_cluster_size: Tensor
            self.ema_embed_sum: Tensor
            self.register_buffer("ema_cluster_size", torch.ones(n_e))  # N_i
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())  # m_i, (K, D)
        if restart_dead_codes is not None:
            # Not persistent, so reference checkpoints still load strictly; after a resume the counters
            # start again from zero, which only postpones the next restart.
            self.steps_unused: Tensor
            self.register_buffer("steps_unused", torch.zeros(n_e, dtype=torch.long), persistent=False)

    def _check_latent(self, z: Tensor) -> None:
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(
                f"VectorQuantizer expects a (B, {self.e_dim}, H, W) latent, got shape {tuple(z.shape)}"
            )

    @torch.no_grad()
    def nearest(self, z_flat: Tensor) -> Tensor:
        """(N, D) vectors -> (N,) index of the closest code, ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e."""
        e = self.embedding.weight  # (K, D)
        d = torch.sum(z_flat**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1) - 2 * z_flat @ e.t()  # (N, K)
        return torch.argmin(d, dim=1)

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, QuantizeInfo]:
        """z (B, D, H, W) -> (z_q with straight-through gradient, codebook loss, info).

        In training mode this also runs the EMA update and dead-code restarts if they are enabled;
        restarts need ``generator``.
        """
        self._check_latent(z)
        if self.training and self.restart_dead_codes is not None and generator is None:
            raise ValueError("restart_dead_codes is set: pass a torch.Generator to draw replacement codes")
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, H, W, D): one D-vector per position
        z_flat = z.view(-1, self.e_dim)  # (B*H*W, D), rows in (b, h, w) order like the reference
        indices = self.nearest(z_flat)  # (B*H*W,)
        z_q = self.embedding(indices).view(z.shape)  # (B, H, W, D)

        commitment = torch.mean((z_q.detach() - z) ** 2)  # pulls the encoder towards its code
        codebook = torch.mean((z_q - z.detach()) ** 2)  # pulls the code towards the encoder output
        w_commit, w_code = (1.0, self.beta) if self.legacy else (self.beta, 1.0)
        if self.ema_decay is not None:
            loss = w_commit * commitment  # the codebook moves by EMA, so its gradient term is dropped
        else:
            loss = w_commit * commitment + w_code * codebook

        counts = torch.bincount(indices, minlength=self.n_e)  # (K,) n_i: positions assigned to code i
        if self.training:
            if self.ema_decay is not None:
                self._ema_update(z_flat.detach(), indices, counts)
            if self.restart_dead_codes is not None:
                assert generator is not None  # checked at the top
                self._restart_dead_codes(z_flat.detach(), counts, generator)

        z_q = z + (z_q - z).detach()  # straight-through estimator: forward z_q, backward identity
        z_q = z_q.permute(0, 3, 1, 2).contiguous()  # (B, D, H, W)
        probs = counts.float() / indices.numel()
        perplexity = torch.exp(-torch.sum(probs * torch.log(probs + 1e-10)))
        usage = (counts > 0).float().mean()
        return z_q, loss, QuantizeInfo(perplexity, usage, indices)

    @torch.no_grad()
    def _ema_update(self, z_flat: Tensor, indices: Tensor, counts: Tensor) -> None:
        """VQ-VAE App. A.1: N_i <- g N_i + (1-g) n_i, m_i <- g m_i + (1-g) sum_j z_ij, e_i = m_i / N_i."""
        gamma = self.ema_decay
        assert gamma is not None  # only called for an EMA codebook
        z_sum = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, z_flat.float())  # (K, D)
        self.ema_cluster_size.mul_(gamma).add_(counts.float(), alpha=1 - gamma)
        self.ema_embed_sum.mul_(gamma).add_(z_sum, alpha=1 - gamma)
        # Laplace smoothing keeps N_i > 0 for codes that have not been used for a long time. Such codes
        # still shrink towards 0 (m_i decays faster than the smoothed N_i); restarts are the remedy.
        n = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + self.ema_eps) / (n + self.n_e * self.ema_eps) * n  # (K,)
        self.embedding.weight.copy_(self.ema_embed_sum / size[:, None])

    @torch.no_grad()
    def _restart_dead_codes(self, z_flat: Tensor, counts: Tensor, generator: torch.Generator) -> None:
        """Re-seed codes unused for ``restart_dead_codes`` steps with random encoder outputs of this batch."""
        limit = self.restart_dead_codes
        assert limit is not None  # only called when restarts are enabled
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = torch.nonzero(self.steps_unused >= limit).squeeze(1)  # (n_dead,)
        if dead.numel() == 0:
            return
        pick = torch.randint(0, z_flat.shape[0], (dead.numel(),), generator=generator, device=generator.device)
        new_codes = z_flat[pick.to(z_flat.device)].to(self.embedding.weight.dtype)  # (n_dead, D)
        self.embedding.weight[dead] = new_codes
        if self.ema_decay is not None:  # restart the averages too, as at initialisation
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = new_codes.float()
        self.steps_unused[dead] = 0

    def get_codebook_entry(self, indices: Tensor, shape: tuple[int, int, int, int] | None) -> Tensor:
        """Codes for flat ``indices`` (N,); with ``shape`` = (B, H, W, D) returned as (B, D, H, W)."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.n_e):
            raise ValueError(
                f"code indices must lie in [0, {self.n_e}), got range [{int(indices.min())}, {int(indices.max())}]"
            )
        z_q = self.embedding(indices.reshape(-1))  # (N, D)
        if shape is None:
            return z_q
        return z_q.view(shape).permute(0, 3, 1, 2).contiguous()  # (B, H, W, D) -> (B, D, H, W)


class VQModel(FirstStage):
    """Encoder/decoder pair with a K-entry codebook between them (CompVis VQModel / VQModelInterface)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        if config.kind != "vq":
            raise ValueError(f"VQModel needs an AutoencoderConfig with kind='vq', got kind={config.kind!r}")
        assert config.n_embed is not None  # checked by AutoencoderConfig
        self.config = config
        dd = config.ddconfig()
        # Registration order = the reference state-dict order.
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quantize = VectorQuantizer(
            config.n_embed,
            config.embed_dim,
            beta=config.beta,
            legacy=config.legacy,
            ema_decay=config.ema_decay,
            restart_dead_codes=config.restart_dead_codes,
        )
        # 1x1 convs between the trunk's bottleneck width and the code width embed_dim.
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    def encode(self, x: Tensor) -> Tensor:
        """Image (B, in_channels, H, W) -> pre-quantisation latent h (B, embed_dim, H/f, W/f)."""
        self._check_image(x)
        return self.quant_conv(self.encoder(x))  # (B, z_channels, h, w) -> (B, embed_dim, h, w)

    def quantize_latent(
        self, h: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, QuantizeInfo]:
        """h -> (z_q, codebook loss, info); see :class:`VectorQuantizer`."""
        return self.quantize(h, generator)

    def decode(self, h: Tensor, force_not_quantize: bool = False) -> Tensor:
        """Latent (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f).

        The latent is snapped to the codebook first unless ``force_not_quantize`` (VQModelInterface):
        a diffusion sample is close to, but not on, the codebook. Unlike :meth:`quantize_latent` this
        never touches the codebook statistics, so decoding in training mode has no side effects.
        """
        if h.dim() != 4 or h.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"VQModel.decode expects a (B, {self.config.embed_dim}, h, w) latent, got shape {tuple(h.shape)}"
            )
        if not force_not_quantize:
            b, d, hh, ww = h.shape
            indices = self.quantize.nearest(h.permute(0, 2, 3, 1).reshape(-1, d))  # (B*h*w,)
            z_q = self.quantize.embedding(indices).view(b, hh, ww, d).permute(0, 3, 1, 2)  # (B, D, h, w)
            h = h + (z_q - h).detach()  # straight-through, as the reference's quantize() call
        return self.decoder(self.post_quant_conv(h))  # (B, z_channels, h, w) -> (B, out_ch, h*f, w*f)

    def decode_code(self, indices: Tensor) -> Tensor:
        """Code indices (B, h, w) -> image (B, out_ch, h*f, w*f)."""
        if indices.dim() != 3:
            raise ValueError(f"VQModel.decode_code expects (B, h, w) code indices, got shape {tuple(indices.shape)}")
        b, hh, ww = indices.shape
        z_q = self.quantize.get_codebook_entry(indices.reshape(-1), (b, hh, ww, self.config.embed_dim))
        return self.decode(z_q, force_not_quantize=True)

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, QuantizeInfo]:
        """Reconstruct ``x`` through the codebook; returns (reconstruction, codebook loss, info)."""
        z_q, loss, info = self.quantize_latent(self.encode(x), generator)
        return self.decode(z_q, force_not_quantize=True), loss, info
